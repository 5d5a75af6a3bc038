"""Run environment episodes against a ``Policy`` service: the multi-turn rollout driver.

Each episode keeps one token list — the prompt, then every turn and observation — and
sends it whole as the next turn's prompt (token ids, never re-tokenized text, so the
trained tokens are the sampled ones). It runs inside ``policy.session()``: all its turns
go to one replica, whose prefix cache then holds the conversation so far and prefills
only the new observation. ``max_turns`` bounds the model's turns and ``max_tokens`` the
response tokens of the episode, the model's and the environment's together.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import zlib
from typing import Any, Callable

import torch

from forge.envs.base import ENV, POLICY, Environment, Rollout, Segment, StepResult, Turn
from forge.util.checks import check_int


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: Any, texts: tuple[str, ...]) -> list[int]:
    """The ids of an environment's stop tokens; each must be exactly one token."""
    ids = []
    for text in texts:
        encoded = encode(tokenizer, text)
        if len(encoded) != 1:
            raise ValueError(f"environment stop token {text!r} is {len(encoded)} tokens for this tokenizer; "
                             "a stop token must be exactly one (add it as a special token, or pick another)")
        ids.append(encoded[0])
    return ids


class EpisodeError(RuntimeError):
    """The environment itself failed (``reset``, ``step`` or ``reward`` raised, or returned
    something it must not): a bug or outage of the environment, not of the policy."""


async def run_episode(policy: Any, env: Environment, row: dict[str, Any], tokenizer: Any, *, max_turns: int = 4,
                      max_tokens: int = 256, sampling_config: dict[str, Any] | None = None,
                      seed: int | None = None, max_context: int | None = None) -> Rollout:
    """One episode of ``env`` on ``row``. ``sampling_config`` overrides the policy's sampling
    per turn (its ``max_tokens`` caps one turn, its ``stop_token_ids`` add to the
    environment's; ``n`` is always 1); with ``seed`` each turn samples from its own seed, so
    the episode depends only on the weights. ``max_context`` (the engine's
    ``max_model_len``) ends the episode before the conversation outgrows it.

    Raises ``EpisodeError`` when the environment fails; errors of the policy propagate as
    they are."""
    check_int("run_episode max_turns", max_turns, 1)
    check_int("run_episode max_tokens", max_tokens, 1)
    name = type(env).__name__
    prompt = _call(f"{name}.reset", env.reset, row)
    if not isinstance(prompt, str) or not prompt:
        raise EpisodeError(f"{name}.reset must return the first prompt as a non-empty string, got {prompt!r}")
    prompt_ids = encode(tokenizer, prompt)
    overrides = dict(sampling_config or {})
    turn_cap = overrides.pop("max_tokens", max_tokens)
    stops = tuple(overrides.pop("stop_token_ids", ())) + tuple(stop_token_ids(tokenizer, env.stop_tokens))
    room = (max_context - 1) if max_context else 1 << 62  # the engine refuses a prompt without room for a token
    context, segments, used, reason = list(prompt_ids), [], 0, "max_turns"
    is_service = hasattr(policy, "session")  # else one Policy actor (as_actor)
    session = policy.session() if is_service else contextlib.nullcontext()
    generate = policy.generate.route if is_service else policy.generate.call_one
    async with session:
        for index in range(max_turns):
            left = min(max_tokens - used, room - len(context))
            if left <= 0:
                reason = "max_tokens"
                break
            config = {**overrides, "n": 1, "max_tokens": min(turn_cap, left), "stop_token_ids": stops}
            if seed is not None:
                config["seed"] = (seed * 1_000_003 + index) % 2**31
            [completion] = await generate(context, sampling_config=config)
            ids = completion.token_ids.tolist()
            segments.append(Segment(POLICY, completion.text, ids, completion.logprobs.tolist(),
                                    completion.generator_version))
            used, context = used + len(ids), context + ids
            result = await _call_async(f"{name}.step", env.step(Turn(completion.text, ids, completion.stop_reason, index)))
            if not isinstance(result, StepResult):
                raise EpisodeError(f"{name}.step must return a StepResult, got {type(result).__name__}")
            if result.done:
                reason = "done"
                break
            observation = encode(tokenizer, result.observation)[: min(max_tokens - used, room - len(context))]
            if not observation:
                reason = "max_tokens"
                break
            segments.append(Segment(ENV, tokenizer.decode(observation), observation))
            used, context = used + len(observation), context + observation
    reward = _call(f"{name}.reward", env.reward)
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise EpisodeError(f"{name}.reward() must return a finite number, got {reward!r}")
    info = _call(f"{name}.info", env.info)
    return Rollout(prompt, torch.tensor(prompt_ids, dtype=torch.long), segments, float(reward), reason, info)


def _call(what: str, function: Callable[..., Any], *args: Any) -> Any:
    try:
        return function(*args)
    except Exception as e:
        raise EpisodeError(f"{what} raised {type(e).__name__}: {e}") from e


async def _call_async(what: str, awaitable: Any) -> Any:
    try:
        return await awaitable
    except Exception as e:
        raise EpisodeError(f"{what} raised {type(e).__name__}: {e}") from e


async def run_group(policy: Any, make_env: Callable[[], Environment], row: dict[str, Any], tokenizer: Any,
                    n: int, seed: int | None = None, **options: Any) -> list[Rollout]:
    """``n`` episodes of one row, each its own conversation (and session), concurrently.
    When one fails, the others still finish (none is left running) and the first error
    is raised."""
    envs = [_call("the environment factory", make_env) for _ in range(n)]
    results = await asyncio.gather(*(
        run_episode(policy, env, row, tokenizer, seed=None if seed is None else zlib.crc32(f"{seed}/{i}".encode()),
                    **options)
        for i, env in enumerate(envs)), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)
