"""Tools for environments: a registry of Python callables, tool-call formats, and
``ToolEnvironment``, the base of an environment whose model calls tools.

The environment executes tools, never the model: it parses calls from the model's turn
text with a ``ToolCallFormat``, runs them through the ``ToolRegistry`` and returns the
rendered results as the next observation. A tool that raises, times out, is unknown or
is called malformed gives an ``error: ...`` observation and the episode goes on, so the
model can learn from its mistakes instead of the run failing.

Two formats are built in:

- ``JsonToolCalls``: ``<tool_call>{"name": "calculator", "arguments": {"expression":
  "2+3"}}</tool_call>``, answered with ``<tool_response>5</tool_response>`` — the format
  of Qwen's and Hermes' chat templates.
- ``CompactToolCalls``: the turn's text up to a one-character marker (``?``) calls one
  tool with the text before the marker as its argument (the question when empty) — for
  character-level models such as the embedded tiny one, which cannot spell a name.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import inspect
import json
import math
import operator
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from forge.envs.base import Environment, StepResult, Turn
from forge.util.checks import check_int, check_seconds


@dataclass
class ToolCall:
    name: str
    arguments: Any = None  # a dict (keyword arguments), one positional value, or None
    error: str | None = None  # set by a format for a call it could not parse


@dataclass
class ToolResult:
    ok: bool
    text: str


class ToolRegistry:
    """Named Python callables (sync or async) the environment runs for the model.

    ``timeout_s`` bounds every call from when it starts. A sync tool runs on a daemon
    thread of its own, at most ``max_workers`` at a time (a burst of calls waits for a
    free one, up to ``queue_timeout_s``), so a slow one does not block the event loop and
    a hung one never blocks the process's exit. Python cannot kill a thread: a timed-out
    sync tool keeps its thread, and its slot, until it returns — a tool that can hang
    forever belongs in a subprocess of its own.
    """

    def __init__(self, tools: dict[str, Callable[..., Any]] | None = None, timeout_s: float = 5.0,
                 max_result_chars: int = 500, max_workers: int = 8, queue_timeout_s: float = 60.0) -> None:
        check_seconds("ToolRegistry timeout_s", timeout_s)
        check_seconds("ToolRegistry queue_timeout_s", queue_timeout_s)
        check_int("ToolRegistry max_result_chars", max_result_chars, 1)
        check_int("ToolRegistry max_workers", max_workers, 1)
        self.timeout_s = timeout_s
        self.queue_timeout_s = queue_timeout_s
        self.max_result_chars = max_result_chars
        self.max_workers = max_workers
        self.tools: dict[str, Callable[..., Any]] = {}
        self._free: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}  # thread slots, per event loop
        for name, function in (tools or {}).items():
            self.register(name, function)

    def register(self, name: str, function: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
            raise ValueError(f"a tool name is an identifier such as 'calculator', got {name!r}")
        if not callable(function):
            raise ValueError(f"tool {name!r} must be callable, got {type(function).__name__}")
        self.tools[name] = function

    async def call(self, call: ToolCall) -> ToolResult:
        """Run one call; every failure becomes an ``error: ...`` result."""
        if call.error is not None:
            return ToolResult(False, f"error: {call.error}")
        function = self.tools.get(call.name)
        if function is None:
            return ToolResult(False, f"error: unknown tool {call.name!r}; tools: {', '.join(sorted(self.tools))}")
        args, kwargs = ((), call.arguments) if isinstance(call.arguments, dict) else (
            (() if call.arguments is None else (call.arguments,)), {})
        try:
            if inspect.iscoroutinefunction(function):
                value = await asyncio.wait_for(function(*args, **kwargs), self.timeout_s)
            else:
                value = await self._on_a_thread(call.name, functools.partial(function, *args, **kwargs))
        except asyncio.TimeoutError:
            return ToolResult(False, f"error: tool {call.name!r} timed out after {self.timeout_s:g} s")
        except _NoFreeThread as e:
            return ToolResult(False, f"error: {e}")
        except Exception as e:  # the tool's own failure is the model's observation
            return ToolResult(False, f"error: {type(e).__name__}: {e}"[: self.max_result_chars])
        return ToolResult(True, str(value)[: self.max_result_chars])

    async def _on_a_thread(self, name: str, work: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        free = self._free.setdefault(loop, asyncio.Semaphore(self.max_workers))
        try:
            await asyncio.wait_for(free.acquire(), self.queue_timeout_s)
        except asyncio.TimeoutError:
            raise _NoFreeThread(f"tool {name!r} did not start: all {self.max_workers} tool threads stayed busy for "
                                f"{self.queue_timeout_s:g} s (hung tools keep theirs)") from None
        done = loop.create_future()

        def finish(value: Any, error: BaseException | None) -> None:
            free.release()  # the thread's slot is free again only now, when the tool returned
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(value)

        def run() -> None:
            try:
                value, error = work(), None
            except BaseException as e:  # noqa: BLE001  (handed to the caller)
                value, error = None, e
            try:
                loop.call_soon_threadsafe(finish, value, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        threading.Thread(target=run, name=f"forge-tool-{name}", daemon=True).start()
        return await asyncio.wait_for(asyncio.shield(done), self.timeout_s)


class _NoFreeThread(RuntimeError):
    pass


class ToolCallFormat(ABC):
    """How tool calls appear in the model's text, and how results are shown to it."""

    stop_token: str | None = None  # ends a turn that calls a tool (one token of the tokenizer)

    @abstractmethod
    def parse(self, text: str) -> list[ToolCall]:
        """The calls in a turn's text; empty when the turn calls no tool (a final answer)."""

    @abstractmethod
    def render(self, results: list[ToolResult]) -> str:
        """The observation inserted after the turn."""


class JsonToolCalls(ToolCallFormat):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one or several per turn."""

    stop_token = "</tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> list[ToolCall]:
        calls = []
        for body in self._CALL.findall(text):
            try:
                value = json.loads(body)
            except json.JSONDecodeError as e:
                calls.append(ToolCall("?", error=f"the tool call is not valid JSON ({e.msg})"))
                continue
            if not isinstance(value, dict) or not isinstance(value.get("name"), str):
                calls.append(ToolCall("?", error='a tool call is {"name": ..., "arguments": {...}}'))
                continue
            calls.append(ToolCall(value["name"], value.get("arguments") or {}))
        return calls

    def render(self, results: list[ToolResult]) -> str:
        return "".join(f"<tool_response>{r.text}</tool_response>" for r in results)


class CompactToolCalls(ToolCallFormat):
    """A turn containing ``marker`` calls ``tool`` with the text before the marker (no
    argument when that is empty: the environment's ``default_argument``); the result is
    shown as ``result + end``."""

    def __init__(self, tool: str, marker: str = "?", end: str = "\n") -> None:
        self.tool, self.stop_token, self.end = tool, marker, end

    def parse(self, text: str) -> list[ToolCall]:
        if self.stop_token not in text:
            return []
        argument = text.split(self.stop_token, 1)[0].strip()
        return [ToolCall(self.tool, argument or None)]

    def render(self, results: list[ToolResult]) -> str:
        return "".join(r.text + self.end for r in results)


class ToolEnvironment(Environment):
    """An environment whose model may call tools before it answers.

    Each turn that calls a tool gets the results as the next observation; the first turn
    that calls none is the final answer, which ``score`` (a subclass's) turns into the
    reward. An episode that ends before any answer (turn or token bound) scores "".
    """

    def __init__(self, tools: ToolRegistry, call_format: ToolCallFormat) -> None:
        self.tools = tools
        self.call_format = call_format
        self.stop_tokens = (call_format.stop_token,) if call_format.stop_token else ()
        self.answer: str | None = None
        self.tool_calls = 0
        self.tool_errors = 0

    async def step(self, turn: Turn) -> StepResult:
        calls = self.call_format.parse(turn.text)
        if not calls:
            self.answer = turn.text
            return StepResult(done=True)
        for call in calls:
            if call.arguments is None:
                call.arguments = self.default_argument()
        results = [await self.tools.call(call) for call in calls]
        self.tool_calls += len(calls)
        self.tool_errors += sum(not r.ok for r in results)
        return StepResult(self.call_format.render(results))

    def reward(self) -> float:
        return float(self.score(self.answer or ""))

    def default_argument(self) -> Any:
        """The argument of a call that gives none (e.g. the question); None: call it bare."""
        return None

    @abstractmethod
    def score(self, answer: str) -> float:
        """The reward of a final answer."""

    def info(self) -> dict[str, float]:
        return {"tool_calls": float(self.tool_calls), "tool_errors": float(self.tool_errors),
                "answered": float(self.answer is not None)}


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses) without
    ``eval``; a trailing ``=`` is ignored. Integral results print without a decimal point."""
    text = str(expression).strip().rstrip("=").strip()
    if len(text) > 200:
        raise ValueError("expression longer than 200 characters")

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(right) * math.log2(abs(left) + 2) > 4096):
                raise ValueError("result too large")  # checked before computing: a huge power holds the GIL
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {text!r}")

    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"not arithmetic: {text!r}") from None
    result = value(tree.body)
    if isinstance(result, float) and math.isfinite(result) and result.is_integer():
        result = int(result)
    return str(result)
