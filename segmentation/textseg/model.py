"""Med-VLM: text-guided segmentation = frozen encoders + LoRA, a 4x feature mixer and a mask decoder.

Shapes (B images, L text tokens, g x g image grid, d = ``mixer.dim``, S = ``image_encoder.image_size``):

    pixels (B, 3, S, S) --image encoder--> F_im (B, C_im, g, g) --1x1 proj + 2D sine position--> (B, g*g, d)
    tokens (B, L)       --text encoder-->  F_text (B, L, H)      --linear proj-->               (B, L, d)
    mixer x depth:   F_text1 = F_text + attn(F_text, F_text)
                     F_text2 = F_text1 + cross_attn(q=F_text1, kv=F_im)
                     F_fused_text = F_text2 + MLP(F_text2)
                     F_fused_im = F_im + cross_attn(q=F_im, kv=F_fused_text)
    existence:       e = MLP([masked mean of F_fused_text ; mean of F_fused_im]) -> one logit per (image, text)
                     (only with ``existence_head``: "is the named structure in this image?")
    decoder:         F1 = dilated convs (d -> c0) then x2 upsampling stages (-> c_last, g * 2**k)
                     F2 = cross_attn(q=F_fused_im, kv=F_fused_text)                (B, g*g, d)
                     mask = sum_c MLP(F2)_c (upsampled to F1's grid) * F1_c          (B, 1, g*2**k, g*2**k)
                     logits = bilinear resize of mask to (S, S)

Deviations from the paper's equations, and why:
- every attention and MLP input is LayerNorm-ed first (pre-norm): training from scratch on a few hundred
  images is unstable without it; the residual structure is exactly the equations'.
- image tokens get a fixed 2D sine position code added before mixing (as SAM does for its decoder): a heart
  and a lung differ mostly by *where* they are, and cross-attention is otherwise permutation invariant.
- "MLP(F2) * F1" needs a reduction to one channel: the element-wise product is summed over channels (the
  hypernetwork dot product of SAM's decoder); MLP(F2) is computed on the g x g grid and upsampled
  bilinearly to F1's grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segmentation.textseg.config import DecoderConfig, MedVLMConfig, MixerConfig
from segmentation.textseg.encoders import ImageEncoder, TextEncoder, build_image_encoder, build_text_encoder

__all__ = [
    "Attention",
    "ExistenceHead",
    "FeatureMixer",
    "MaskDecoder",
    "MedVLM",
    "MixerBlock",
    "build_medvlm",
    "sine_position_2d",
]


class Attention(nn.Module):
    """Multi-head attention ``(query (B,Nq,d), key_value (B,Nk,d), key_mask (B,Nk) bool, True = keep)``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, query: Tensor, key_value: Tensor, key_mask: Tensor | None = None,
                key_pos: Tensor | None = None) -> Tensor:
        b, nq, d = query.shape
        nk = key_value.shape[1]
        h = self.heads
        keys = key_value if key_pos is None else key_value + key_pos
        q = self.q(query).view(b, nq, h, d // h).transpose(1, 2)
        k = self.k(keys).view(b, nk, h, d // h).transpose(1, 2)
        v = self.v(key_value).view(b, nk, h, d // h).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(b, nq, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def sine_position_2d(grid: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2D sine/cosine position code, ``(grid*grid, dim)``; half the channels for y, half for x."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    coords = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid * 2 * math.pi
    ang = coords[:, None] * freqs[None, :] * (grid / 4)
    emb1d = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, 2*quarter)
    y = emb1d[:, None, :].expand(grid, grid, 2 * quarter)
    x = emb1d[None, :, :].expand(grid, grid, 2 * quarter)
    pos = torch.cat([y, x], dim=2).reshape(grid * grid, 4 * quarter)
    if pos.shape[1] < dim:
        pos = F.pad(pos, (0, dim - pos.shape[1]))
    return pos


class MixerBlock(nn.Module):
    """One block of the feature mixer (equations in the module docstring)."""

    def __init__(self, cfg: MixerConfig):
        super().__init__()
        d = cfg.dim
        self.norm_t1 = nn.LayerNorm(d)
        self.self_attn = Attention(d, cfg.heads, cfg.dropout)
        self.norm_t2 = nn.LayerNorm(d)
        self.norm_i1 = nn.LayerNorm(d)
        self.text_to_image = Attention(d, cfg.heads, cfg.dropout)
        self.norm_t3 = nn.LayerNorm(d)
        self.mlp = MLP(d, int(d * cfg.mlp_ratio))
        self.norm_i2 = nn.LayerNorm(d)
        self.norm_t4 = nn.LayerNorm(d)
        self.image_to_text = Attention(d, cfg.heads, cfg.dropout)

    def forward(self, f_im: Tensor, f_text: Tensor, text_mask: Tensor, im_pos: Tensor) -> tuple[Tensor, Tensor]:
        """``f_im (B, N, d)``, ``f_text (B, L, d)``, ``text_mask (B, L)`` True for real tokens, ``im_pos (N, d)``.

        Returns ``(F_fused_im, F_fused_text)`` with the input shapes."""
        t = self.norm_t1(f_text)
        f_text1 = f_text + self.self_attn(t, t, text_mask)
        im = self.norm_i1(f_im)
        f_text2 = f_text1 + self.text_to_image(self.norm_t2(f_text1), im, key_pos=im_pos)
        f_fused_text = f_text2 + self.mlp(self.norm_t3(f_text2))
        f_fused_im = f_im + self.image_to_text(self.norm_i2(f_im) + im_pos, self.norm_t4(f_fused_text), text_mask)
        return f_fused_im, f_fused_text


class FeatureMixer(nn.Module):
    """``depth`` MixerBlocks stacked (the paper stacks 4)."""

    def __init__(self, cfg: MixerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(MixerBlock(cfg) for _ in range(cfg.depth))

    def forward(self, f_im: Tensor, f_text: Tensor, text_mask: Tensor, im_pos: Tensor) -> tuple[Tensor, Tensor]:
        for block in self.blocks:
            f_im, f_text = block(f_im, f_text, text_mask, im_pos)
        return f_im, f_text


class MaskDecoder(nn.Module):
    """``(F_fused_im (B, g*g, d), F_fused_text (B, L, d), text_mask, grid g) -> mask logits (B, 1, g*2^k, g*2^k)``."""

    def __init__(self, dim: int, cfg: DecoderConfig):
        super().__init__()
        c0 = cfg.channels[0]
        convs: list[nn.Module] = []
        cin = dim
        for dil in cfg.dilations:
            convs += [nn.Conv2d(cin, c0, 3, padding=dil, dilation=dil), nn.GroupNorm(_groups(c0), c0), nn.GELU()]
            cin = c0
        self.dilated = nn.Sequential(*convs)
        ups: list[nn.Module] = []
        for cout in cfg.channels[1:]:
            ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                     nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(_groups(cout), cout),
                                     nn.GELU()))
            cin = cout
        self.upsample = nn.Sequential(*ups)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, cfg.heads)
        self.mlp = MLP(dim, dim, cfg.channels[-1])

    def forward(self, f_im: Tensor, f_text: Tensor, text_mask: Tensor, grid: int) -> Tensor:
        b, _, d = f_im.shape
        spatial = f_im.transpose(1, 2).reshape(b, d, grid, grid)
        f1 = self.upsample(self.dilated(spatial))  # (B, c_last, G, G)
        f2 = self.cross_attn(self.norm_q(f_im), self.norm_kv(f_text), text_mask)  # (B, g*g, d)
        weights = self.mlp(f2).transpose(1, 2).reshape(b, -1, grid, grid)
        if weights.shape[-1] != f1.shape[-1]:
            weights = F.interpolate(weights, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        return (weights * f1).sum(dim=1, keepdim=True)


class ExistenceHead(nn.Module):
    """``(F_fused_im (B, N, d), F_fused_text (B, L, d), text_mask (B, L)) -> logit (B,)``: is the structure the
    text names in the image? Reads the text tokens after they attended to the image (masked mean) beside the
    mean image token; trained with BCE against "the mask is non-empty"."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.mlp = MLP(2 * dim, dim, 1)

    def forward(self, f_im: Tensor, f_text: Tensor, text_mask: Tensor) -> Tensor:
        m = text_mask.to(f_text.dtype)[..., None]
        text = (f_text * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.mlp(self.norm(torch.cat([text, f_im.mean(1)], dim=-1)))[:, 0]


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class MedVLM(nn.Module):
    """The full model. ``forward(pixels (B,3,S,S) normalised, input_ids (B,L), attention_mask (B,L))`` returns
    mask logits ``(B, 1, S, S)`` in the encoder's input frame (see ``segmentation.textseg.predictor`` for the
    mapping to original pixels). ``forward_features`` takes the cached image-prefix features instead."""

    def __init__(self, config: MedVLMConfig, image_encoder: ImageEncoder, text_encoder: TextEncoder):
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        d = config.mixer.dim
        self.image_proj = nn.Conv2d(image_encoder.out_channels, d, 1)
        self.text_proj = nn.Linear(text_encoder.hidden_size, d)
        self.mixer = FeatureMixer(config.mixer)
        self.decoder = MaskDecoder(d, config.decoder)
        self.existence = ExistenceHead(d) if config.existence_head else None
        self.register_buffer("im_pos", sine_position_2d(image_encoder.grid, d), persistent=False)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_proj(self.text_encoder(input_ids, attention_mask))

    def forward_features(self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``prefix``: ``image_encoder.prefix(pixels)`` (may be cached); one row per text (repeat for sharing)."""
        return self.forward_encoded(self.image_encoder.suffix(prefix), input_ids, attention_mask)

    def forward_encoded(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``features``: the image encoder's output ``(B, C_im, g, g)``; returns logits ``(B, 1, S, S)``."""
        return self.forward_with_existence(features, input_ids, attention_mask)[0]

    def forward_with_existence(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor,
                               ) -> tuple[Tensor, Tensor | None]:
        """``(mask logits (B, 1, S, S), existence logits (B,) or None without an existence head)``."""
        f_text = self.encode_text(input_ids, attention_mask)
        return self.forward_text_features(features, f_text, attention_mask.to(torch.bool))

    def forward_text_features(self, features: Tensor, f_text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """As :meth:`forward_with_existence`, with the projected text features ``f_text (B, L, d)`` and their
        bool ``mask (B, L)`` given (e.g. cached, or from a compiled text encoder). ``features (1 or B, C_im, g, g)``:
        one image is projected once and shared by the ``B`` texts."""
        f_im = self.image_proj(features)  # (1 or B, d, g, g)
        g = f_im.shape[-1]
        tokens = f_im.flatten(2).transpose(1, 2).expand(f_text.shape[0], -1, -1)
        fused_im, fused_text = self.mixer(tokens, f_text, mask, self.im_pos)
        logits = self.decoder(fused_im, fused_text, mask, g)
        size = self.config.image_encoder.image_size
        exist = None if self.existence is None else self.existence(fused_im, fused_text, mask)
        return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False), exist

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.forward_features(self.image_encoder.prefix(pixels), input_ids, attention_mask)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only what trains (adapters, projections, mixer, decoder, heads): the checkpoint content, including
        what :meth:`freeze_except` holds still for one training run."""
        names = {n for n, p in self.named_parameters() if p.requires_grad} | getattr(self, "held_still", set())
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k in names}

    def freeze_except(self, prefixes: Sequence[str]) -> int:
        """Stop gradients to every trainable parameter whose name starts with none of ``prefixes`` (e.g.
        ``["existence."]``: train the existence head alone); they stay in the checkpoint. Returns how many
        parameters still train; an empty match is an error (a typo would otherwise train nothing)."""
        keep = tuple(prefixes)
        held = {n for n, p in self.named_parameters() if p.requires_grad and not n.startswith(keep)}
        left = [n for n, p in self.named_parameters() if p.requires_grad and n.startswith(keep)]
        if not left:
            from medvlm.errors import input_error

            raise input_error("train_modules", expected="prefixes of trainable parameter names (existence., "
                              "decoder., mixer., image_proj., text_proj.)", received=str(list(prefixes)),
                              fix="use e.g. train_modules: [existence.]")
        for n, p in self.named_parameters():
            if n in held:
                p.requires_grad_(False)
        self.held_still: set[str] = getattr(self, "held_still", set()) | held
        return sum(p.numel() for n, p in self.named_parameters() if p.requires_grad)

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total


def build_medvlm(config: MedVLMConfig) -> MedVLM:
    """Build the model: frozen bases loaded (or random for tiny configs), adapters and heads randomly initialised."""
    config.validate()
    model = MedVLM(config, build_image_encoder(config.image_encoder), build_text_encoder(config.text_encoder))
    return model
