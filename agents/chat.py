"""The chat path of ``medvlm ask`` with an LLM endpoint: a LangGraph tool-calling loop over the grounding tools.

question + image -> model turn (OpenAI-compatible ``/chat/completions`` with ``tools``) -> the tools it called
(``ground``, ``segment``, ``link_report``) run on the ORIGINAL image through the :class:`GroundingAgent` -> their
JSON summaries go back to the model as ``tool`` messages -> ... -> the model's final text. At most
:data:`MAX_TURNS` model turns; the last one is sent with ``tool_choice="none"`` so that it answers in text.

The model sees the image (a PNG data URL in the first user message, downscaled to at most 1024 px a side) and
short JSON summaries of the tool results; the full :class:`~medvlm.types.Region` objects (masks, points,
provenance, anatomy checks) stay on the side and become :attr:`Answer.regions`. Every box, in the summaries and
in the regions, is pixel xyxy of the original image (``MedicalImage.shape``), whatever size was sent.

LangGraph and LangChain Core are optional: they are imported when a chat runs, and their absence raises
:class:`~medvlm.errors.MissingDependencyError` naming ``pip install langgraph langchain-core``.
"""

from __future__ import annotations

import json
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

from agents.llm import LLMError
from agents.pipeline import Answer, compose_answer
from medvlm.errors import InputError, MedvlmError, input_error, missing_dependency
from medvlm.types import Region

if TYPE_CHECKING:
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.tools import BaseTool

    from agents.grounders.base import GroundingResult

__all__ = ["MAX_TOOL_CALLS_PER_TURN", "MAX_TURNS", "SYSTEM_PROMPT", "ChatLog", "build_chat_graph", "build_tools",
           "chat_answer", "from_openai_message", "to_openai_messages"]

#: model turns per question; the last is asked for text only (tool_choice "none")
MAX_TURNS = 4
#: tool calls run per model turn; more are answered with an error (each one is a grounding pass on the image)
MAX_TOOL_CALLS_PER_TURN = 6

SYSTEM_PROMPT = (
    "You are a radiology assistant. Answer the user's question about the attached medical image. Do not guess "
    "locations or coordinates: call the tools. ground(phrase) locates a finding or structure described by a short "
    "phrase, e.g. 'right apical pneumothorax'; segment(structure) outlines an anatomical structure, e.g. 'left "
    "lung'; link_report(report) links each sentence of a radiology report to image regions. Tool boxes are "
    "[x0, y0, x1, y1] in pixels of the original image ({width} x {height} px, x to the right, y down); the "
    "attached copy is {sent_width} x {sent_height} px. On a chest X-ray the patient's right is on the image left. "
    "Finish with one short paragraph that says where the target is, with the box, the score and the anatomy "
    "check of each region the tools returned, and say so plainly when a tool found nothing."
)

_INSTALL = "pip install langgraph langchain-core (or run medvlm ask with --no-chat)"


class ChatState(TypedDict):
    """LangGraph state: the conversation (appended to by each node) and the number of model turns so far."""

    messages: Annotated[list[Any], operator.add]
    turns: int


@dataclass
class ChatLog:
    """What the tools did during one chat, kept beside the conversation (the model only sees JSON summaries).

    ``regions``: every region the tools returned (original pixels), in call order, duplicates included.
    ``phrases``: the phrases grounded. ``texts``: one readable sentence per grounding, used as the answer when
    the model gives no final text. ``notes``: grounder notes ("phrase: why nothing was found").
    ``calls``: ``{"name", "args"}`` of every tool call the model made (malformed ones included, ``args`` then
    being the raw argument text). ``grounded``: whether at least one grounding ran. ``turns``: model turns started.
    """

    regions: list[Region] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    grounded: bool = False
    turns: int = 0


def _import_error(exc: ImportError) -> MedvlmError:
    return missing_dependency("medvlm ask with an LLM (the tool-calling chat)", _INSTALL)


def _region_summary(region: Region) -> dict[str, Any]:
    """The part of a region the LLM needs: label, box (original pixels, rounded), score, anatomy check."""
    out: dict[str, Any] = {"label": region.label, "box": [round(v) for v in region.box.to_list()],
                           "score": None if region.score is None else round(float(region.score), 3),
                           "check": str(region.checks.get("action", "none"))}
    where = region.provenance.get("regions")
    if where:
        out["anatomy"] = list(where)
    return out


def build_tools(agent: Any, image: Any, log: ChatLog) -> list[BaseTool]:
    """The LangChain tools of one chat, closing over ``agent`` (a :class:`~agents.pipeline.GroundingAgent`),
    ``image`` (the original :class:`~medvlm.io.MedicalImage`) and ``log`` (where regions are kept).

    Each tool returns a JSON string for the LLM; boxes are ``[x0, y0, x1, y1]`` original pixels. Grounding errors
    raised as :class:`~medvlm.errors.MedvlmError` propagate to the caller (the tools node turns them into error
    messages for the model)."""
    try:
        from langchain_core.tools import StructuredTool
    except ImportError as exc:
        raise _import_error(exc) from exc
    spacing = getattr(image, "spacing_mm", None)
    size = {"width": int(image.width), "height": int(image.height)}

    def run_ground(phrase: str, what: str) -> str:
        phrase = " ".join(str(phrase).split())
        if not phrase:
            raise input_error(what, expected="a non-empty phrase", received=repr(phrase),
                              fix="call the tool again with e.g. {\"phrase\": \"left lung\"}")
        [(result, regions)] = agent.ground_phrases(image, [phrase])
        _keep(log, phrase, result, regions, compose_answer(phrase, result, regions, spacing))
        return json.dumps({"phrase": phrase, "found": len(regions), "regions": [_region_summary(r) for r in regions],
                           "note": result.note, "image_size_px": size})

    def ground(phrase: str) -> str:
        return run_ground(phrase, "ground(phrase)")

    def segment(structure: str) -> str:
        # the grounders segment anatomy from its name: a structure is grounded like any phrase (Med-VLM returns
        # the organ mask, an LLM grounder a box that the refiner turns into a mask)
        return run_ground(structure, "segment(structure)")

    def link_report_tool(report: str) -> str:
        from agents.report import link_report

        links = link_report(agent, image, report)
        sentences = []
        for link in links:
            log.regions.extend(link.regions)
            wanted = [m["text"] for m in link.mentions if m.get("assertion") != "absent"]
            if link.status == "grounded":
                log.phrases.extend(wanted)
            where = "; ".join(f"{r.label} [{', '.join(f'{v:.0f}' for v in r.box.to_list())}]" for r in link.regions)
            log.texts.append(f"Report sentence {link.number} ({link.status}): {where or link.note or link.text}.")
            sentences.append({"number": link.number, "text": link.text, "status": link.status,
                              "regions": [_region_summary(r) for r in link.regions], "note": link.note})
        log.grounded = True
        return json.dumps({"sentences": sentences, "image_size_px": size})

    return [
        StructuredTool.from_function(
            func=ground, name="ground",
            description="Locate what a short medical phrase refers to in the image (a finding with its location, "
            "or a structure), e.g. 'right apical pneumothorax'. Returns JSON: regions with label, box [x0, y0, x1, "
            "y1] in original-image pixels, score in [0, 1], anatomy check action, and a note when nothing was found."),
        StructuredTool.from_function(
            func=segment, name="segment",
            description="Outline an anatomical structure by name, e.g. 'left lung', 'heart', 'right clavicle'. "
            "Returns the same JSON as ground (box in original-image pixels; a mask is kept for the answer)."),
        StructuredTool.from_function(
            func=link_report_tool, name="link_report",
            description="Link each sentence of a radiology report to regions of the image. Returns JSON: per "
            "sentence its status (grounded, negated or not_groundable), regions (boxes in original-image pixels) "
            "and a note saying why a sentence has none."),
    ]


def _keep(log: ChatLog, phrase: str, result: GroundingResult, regions: Sequence[Region], text: str) -> None:
    log.regions.extend(regions)
    log.phrases.append(phrase)
    log.texts.append(text)
    if result.note:
        log.notes.append(f"{phrase}: {result.note}")
    log.grounded = True


# ---------------------------------------------------------------------------------------------- message conversion


def to_openai_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> OpenAI chat JSON. An AI message's malformed tool calls are sent back as they came
    (raw argument text) so that every ``tool`` message answers a ``tool_call_id`` the server saw."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    out: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": m.content})
        elif isinstance(m, HumanMessage):
            out.append({"role": "user", "content": m.content})  # a str, or [image_url part, text part]
        elif isinstance(m, ToolMessage):
            content = m.content if isinstance(m.content, str) else json.dumps(m.content)
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": content})
        elif isinstance(m, AIMessage):
            calls = [{"id": c["id"], "type": "function",
                      "function": {"name": c["name"], "arguments": json.dumps(c["args"])}} for c in m.tool_calls]
            calls += [{"id": c["id"], "type": "function",
                       "function": {"name": c["name"] or "", "arguments": c["args"] or ""}}
                      for c in m.invalid_tool_calls]
            text = m.content if isinstance(m.content, str) else m.text
            msg: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:  # some servers reject an empty tool_calls list
                msg["tool_calls"] = calls
            out.append(msg)
        else:
            raise input_error("chat message", expected="a system, human, AI or tool message",
                              received=type(m).__name__, fix="build the conversation from langchain_core messages")
    return out


def from_openai_message(message: dict[str, Any], turn: int = 0) -> AIMessage:
    """An OpenAI assistant message (as :meth:`agents.llm.OpenAIChatClient.chat_message` returns it) -> an
    ``AIMessage``. Tool calls whose arguments are not a JSON object become ``invalid_tool_calls`` (with the
    reason); calls without an id get ``call_<turn>_<k>``."""
    from langchain_core.messages import AIMessage
    from langchain_core.messages.tool import invalid_tool_call, tool_call

    valid, invalid = [], []
    for k, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        fn = fn if isinstance(fn, dict) else {}
        name = str(fn.get("name") or "")
        call_id = str((call.get("id") if isinstance(call, dict) else None) or f"call_{turn}_{k}")
        raw = fn.get("arguments")
        if isinstance(raw, dict):  # a few servers send the object itself
            valid.append(tool_call(name=name, args=raw, id=call_id))
            continue
        try:
            args = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
        except ValueError as exc:
            invalid.append(invalid_tool_call(name=name, args=str(raw), id=call_id, error=f"not valid JSON ({exc})"))
            continue
        if not isinstance(args, dict):
            invalid.append(invalid_tool_call(name=name, args=str(raw), id=call_id,
                                             error=f"a JSON {type(args).__name__}, not an object"))
            continue
        valid.append(tool_call(name=name, args=args, id=call_id))
    content = message.get("content")
    return AIMessage(content=content if isinstance(content, str) else "", tool_calls=valid, invalid_tool_calls=invalid)


# ---------------------------------------------------------------------------------------------------------- graph


def _tool_error(text: str) -> str:
    return json.dumps({"error": text[:600]})


def build_chat_graph(agent: Any, image: Any, log: ChatLog, *, max_turns: int = MAX_TURNS,
                     max_tokens: int = 512) -> Any:
    """The compiled LangGraph: ``model`` (one chat completion with the tools' OpenAI specs) -> ``tools`` (when the
    model called any and turns are left) -> ``model`` ... -> end. ``agent.llm`` must have ``chat_message``
    (:class:`agents.llm.OpenAIChatClient`). Invoke it with ``{"messages": [...], "turns": 0}``."""
    try:
        from langchain_core.messages import AIMessage, ToolMessage
        from langchain_core.utils.function_calling import convert_to_openai_tool
        from langgraph.graph import END, START, StateGraph
    except ImportError as exc:
        raise _import_error(exc) from exc

    tools = {t.name: t for t in build_tools(agent, image, log)}
    specs = [convert_to_openai_tool(t) for t in tools.values()]
    llm = agent.llm

    def model(state: ChatState) -> dict[str, Any]:
        turn = state["turns"] + 1
        log.turns = turn
        # the last turn may not call tools: whatever it says is the answer (the regions are already kept)
        reply = llm.chat_message(to_openai_messages(state["messages"]), tools=specs,
                                 tool_choice="none" if turn >= max_turns else "auto", max_tokens=max_tokens)
        return {"messages": [from_openai_message(reply, turn)], "turns": turn}

    def route(state: ChatState) -> str:
        last = state["messages"][-1]
        wants = isinstance(last, AIMessage) and bool(last.tool_calls or last.invalid_tool_calls)
        return "tools" if wants and state["turns"] < max_turns else END

    def run_tools(state: ChatState) -> dict[str, Any]:
        ai: AIMessage = state["messages"][-1]
        # (id, name, args (a dict, or the raw text of a malformed call), why malformed or None)
        calls: list[tuple[str | None, str, Any, str | None]] = [
            (c["id"], c["name"], c["args"], None) for c in ai.tool_calls]
        calls += [(c["id"], c["name"] or "", c["args"], c["error"]) for c in ai.invalid_tool_calls]
        out = []
        for k, (call_id, name, args, error) in enumerate(calls):
            log.calls.append({"name": name, "args": args})
            status = "error"
            if k >= MAX_TOOL_CALLS_PER_TURN:
                content = _tool_error(f"skipped: at most {MAX_TOOL_CALLS_PER_TURN} tool calls are run per turn")
            elif error is not None:
                content = _tool_error(f"the arguments of {name!r} are {error}; call it again with a JSON object, "
                                      "e.g. {\"phrase\": \"left lung\"}")
            elif name not in tools:
                content = _tool_error(f"unknown tool {name!r}; the tools are {', '.join(tools)}")
            else:
                try:
                    content, status = str(tools[name].invoke(args)), "success"
                except (MedvlmError, ValueError, TypeError) as exc:
                    # bad arguments (pydantic's ValidationError is a ValueError) or a phrase the grounder
                    # refuses: the model can read the reason and retry, the chat goes on
                    why = " ".join(ln.strip() for ln in str(exc).splitlines() if "errors.pydantic.dev" not in ln)
                    content = _tool_error(f"{name} failed: {type(exc).__name__}: {why}")
            out.append(ToolMessage(content=content, tool_call_id=call_id or f"call_{k}", name=name or "unknown",
                                   status=status))
        return {"messages": out}

    graph = StateGraph(ChatState)
    graph.add_node("model", model)
    graph.add_node("tools", run_tools)
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", route, {"tools": "tools", END: END})
    graph.add_edge("tools", "model")
    return graph.compile()


# --------------------------------------------------------------------------------------------------------- answer


def _dedup(regions: Sequence[Region]) -> list[Region]:
    """First region of each (label, box rounded to 0.1 px): a phrase grounded twice gives its regions once."""
    seen: set[tuple[str, tuple[float, ...]]] = set()
    out = []
    for r in regions:
        key = (r.label, tuple(round(v, 1) for v in r.box.to_list()))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _extract(agent: Any, question: str) -> str:
    """The phrase of ``question``: ``agent.extract_phrase`` (the LLM, then the rules); the rules alone when the
    LLM fails (the chat may be falling back precisely because it does)."""
    from agents.text import extract_target

    try:
        return str(agent.extract_phrase(question))
    except LLMError:
        return extract_target(question)


def _fallback(agent: Any, image: Any, question: str, reason: str, chat: dict[str, Any], t0: float) -> Answer:
    """The answer of the pipeline without chat (:meth:`GroundingAgent.ask`), with ``reason`` in the note."""
    from agents.text import extract_target

    try:
        answer = agent.ask(image, question)
    except LLMError:
        # ask() extracts the phrase with the same LLM that just failed; the rules do without it
        phrase = extract_target(question)
        [(result, regions)] = agent.ground_phrases(image, [phrase])
        answer = Answer(question=question, phrase=phrase, regions=regions, grounder=agent.grounder.name,
                        text=compose_answer(phrase, result, regions, getattr(image, "spacing_mm", None)),
                        note=result.note, meta={"parsed": result.meta})
    answer.note = "; ".join(n for n in (f"chat fallback: {reason}; answered without the chat", answer.note) if n)
    answer.meta = {**answer.meta, "chat": {**chat, "fallback": reason}}
    answer.timings_s = {**answer.timings_s, "chat_total": time.perf_counter() - t0}
    return answer


def chat_answer(agent: Any, image: Any, question: str, *, max_turns: int = MAX_TURNS,
                max_tokens: int = 512) -> Answer:
    """Answer ``question`` about ``image`` (a :class:`~medvlm.io.MedicalImage`) with the LLM of ``agent`` (a
    :class:`~agents.pipeline.GroundingAgent` whose ``llm`` is an :class:`agents.llm.OpenAIChatClient`) calling the
    grounding tools; at most ``max_turns`` model turns.

    Returns an :class:`Answer`: ``text`` = the model's final message; ``regions`` = every region the tools
    returned (original pixels, deduplicated by label + box); ``phrase`` = the phrases grounded, joined by "; ";
    ``meta["chat"]`` = ``{"turns", "tool_calls": [{"name", "args"}], ...}``. When the model answers without
    grounding anything, the question's phrase (``agent.extract_phrase``) is grounded so that the answer still
    carries regions (``meta["chat"]["auto_grounded"]``). When its final text is empty, the text is composed from
    the regions grounded (or, nothing grounded, comes from ``agent.ask``). When the LLM fails (connection, HTTP
    error, a server without tool calling), the answer is ``agent.ask``'s and ``note`` says why.
    """
    if not isinstance(question, str) or not question.strip():
        raise input_error("question", expected="a question about the image", received=repr(question),
                          fix="ask e.g. 'where is the right apical pneumothorax?'")
    llm = getattr(agent, "llm", None)
    if llm is None or not callable(getattr(llm, "chat_message", None)):
        raise input_error("chat", expected="an agent whose llm is an OpenAIChatClient (tool calling)",
                          received=f"llm {type(llm).__name__}",
                          fix="pass --llm-url and --llm-model, or ask with --no-chat")
    if not isinstance(max_turns, int) or max_turns < 1:
        raise input_error("max_turns", expected="a positive number of model turns", received=repr(max_turns),
                          fix="pass e.g. max_turns=4")
    t0 = time.perf_counter()
    log = ChatLog()
    graph = build_chat_graph(agent, image, log, max_turns=max_turns, max_tokens=max_tokens)
    from langchain_core.messages import HumanMessage, SystemMessage

    from agents.llm import image_data_url

    url, (sent_h, sent_w) = image_data_url(image.to_rgb_uint8())
    messages = [SystemMessage(content=SYSTEM_PROMPT.format(width=image.width, height=image.height,
                                                           sent_width=sent_w, sent_height=sent_h)),
                HumanMessage(content=[{"type": "image_url", "image_url": {"url": url}},
                                      {"type": "text", "text": question.strip()}])]

    def chat_meta(**extra: Any) -> dict[str, Any]:
        return {"model": getattr(llm, "model", ""), "turns": log.turns, "tool_calls": list(log.calls), **extra}

    try:
        state = graph.invoke({"messages": messages, "turns": 0}, config={"recursion_limit": 2 * max_turns + 4})
    except LLMError as exc:
        return _fallback(agent, image, question, f"the LLM failed at turn {log.turns} ({exc})", chat_meta(), t0)
    final = state["messages"][-1]
    text = (final.text if hasattr(final, "text") else str(final.content)).strip()
    stopped = "turn_cap" if getattr(final, "tool_calls", None) or getattr(final, "invalid_tool_calls", None) \
        else "answered"
    notes: list[str] = []
    extra: dict[str, Any] = {"stopped": stopped}
    if not text and not log.grounded:
        return _fallback(agent, image, question, "the model gave no answer and grounded nothing",
                         chat_meta(**extra), t0)
    if not log.grounded:
        # the model answered from the image alone: ground the question's phrase so that the answer has regions
        try:
            phrase = _extract(agent, question)
            [(result, regions)] = agent.ground_phrases(image, [phrase])
            _keep(log, phrase, result, regions, compose_answer(phrase, result, regions,
                                                               getattr(image, "spacing_mm", None)))
            extra["auto_grounded"] = phrase
            notes.append(f"the model called no grounding tool; the regions are those of {phrase!r}")
        except InputError as exc:  # the question names nothing to ground ("hello")
            notes.append(f"the model called no grounding tool and the question names nothing to ground ({exc})")
    if not text:
        text = " ".join(log.texts)
        notes.append(f"the model gave no final text after {log.turns} turns; the text is composed from the "
                     "regions its tools grounded")
    total = time.perf_counter() - t0
    return Answer(question=question, phrase="; ".join(_unique(log.phrases)), text=text,
                  regions=_dedup(log.regions), grounder=agent.grounder.name, note="; ".join(notes + log.notes),
                  timings_s={"total": total}, meta={"chat": chat_meta(**extra)})
