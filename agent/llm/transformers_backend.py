"""In-process chat model with transformers (the embedded default).

* bf16 on CPUs with bf16 instructions, else float32 (``RECAGENT_LLM_DTYPE``); each forward pass runs on one
  thread or on ``threads`` threads, whichever :class:`~agent.llm.threads.ThreadGovernor` measures faster for that
  kind of pass (short prompt, micro-batch, decoding step);
* ``score_labels`` runs one forward pass and reuses the KV cache of the longest prefix shared with the previous
  prompt (the static instructions at least; the history too when the same user is scored again);
* ``score_markers`` scores every occurrence of a marker token in one pass, on a copy of the model with a trained
  ranker's LoRA adapter merged in (loaded once per adapter folder; generation keeps the untouched model);
* ``generate_json`` decodes under an xgrammar JSON-schema grammar, so its output always parses and validates;
* ``complete_batch`` decodes several short continuations together: the prompt prefix they share (instructions,
  history) is computed once, each row's own suffix is padded in between, and every decoding step is one batched
  forward pass. Finished rows leave the batch; the loop checks ``cancelled()`` before each step.

One lock serves the model (:class:`~agent.llm.priority.PriorityLock`): score passes go first, then the ranking
passes of requests that go on to explain (``BACKGROUND``), then generation, which takes the lock one step at a
time. A hook before every decoder layer offers the lock to waiting passes of a higher priority, so a score
request waits for at most one layer of a background pass or of a decoding step, which then resume.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from agent.llm.base import (
    ChatMessage,
    LLMBackend,
    LLMError,
    MarkerRequest,
    ScoreRequest,
    TextRequest,
    cut_at_stop,
    deadline_var,
    word_variants,
)
from agent.llm.config import LLMConfig, torch_dtype
from agent.llm.priority import Priority, PriorityLock, priority_var
from agent.llm.threads import ForwardPass, ThreadGovernor, pass_kind

logger = logging.getLogger(__name__)
def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence of ``seqs`` shares, leaving each at least one token of its own (the
    position a batched pass reads)."""
    return min([len(s) - 1 for s in seqs] + [common_prefix(seqs[0], s) for s in seqs[1:]])


MIN_REUSE = 8  # reuse a cached prefix only when at least this many tokens match
SUFFIX_CHUNK = 512  # tokens of a batch's own prompt parts per forward pass (bounds the attention's size)


class TransformersBackend(LLMBackend):
    name = "transformers"

    def __init__(self, config: LLMConfig | None = None) -> None:
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from agent.llm.model_files import ensure_llm_model

        self.config = config or LLMConfig()
        self.model_dir = self.config.model_path or str(ensure_llm_model())
        torch.set_num_threads(self.config.threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.dtype = getattr(torch, torch_dtype(self.config))
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
        self.model.eval()
        self._lock = PriorityLock()
        self._paused = threading.local()  # seconds this thread's pass spent waiting inside hooks
        self._hook_layers(self.model)
        self._caches: dict[str, tuple[list[int], Any]] = {}  # per model: the ids its KV cache holds, the cache
        self._rankers: dict[str, Any] = {}
        self._grammars: dict[str, Any] = {}
        self._compiler: Any = None
        self._label_ids: dict[str, int] = {}
        self._word_ids: dict[str, list[list[int]]] = {}
        self._digit_ids: Any = None
        self.governor = ThreadGovernor(self.config.threads)

    @property
    def model_name(self) -> str:
        from pathlib import Path

        return Path(self.model_dir).name

    # --- prompts -------------------------------------------------------------------------------------------
    def render(self, messages: Sequence[ChatMessage], answer_prefix: str = "") -> list[int]:
        text = str(self.tokenizer.apply_chat_template(list(messages), tokenize=False,  # type: ignore[arg-type]
                                                      add_generation_prompt=True))
        ids: list[int] = self.tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"]
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def label_id(self, label: str) -> int:
        if label not in self._label_ids:
            ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise LLMError(f"label {label!r} is not a single token for {self.model_name}")
            self._label_ids[label] = ids[0]
        return self._label_ids[label]

    def _hook_layers(self, model: Any) -> None:
        """Before each decoder layer of ``model``: let waiting passes of a higher priority run (the lock's
        :meth:`~agent.llm.priority.PriorityLock.offer`); the wait is kept out of the pass's timing."""
        def offer(module: Any, args: Any) -> None:
            waited = self._lock.offer()
            if waited:
                self._paused.seconds = getattr(self._paused, "seconds", 0.0) + waited

        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:  # another architecture: score passes then go first between steps only
            logger.warning("no decoder layers found on %s: score passes wait for whole steps",
                           type(model).__name__)
            return
        for layer in layers:
            layer.register_forward_pre_hook(offer)

    @contextmanager
    def threads_for(self, new_tokens: int, kind: str | None = None) -> Iterator[ForwardPass]:
        """Run the enclosed forward pass(es) on the thread count chosen for their kind, and time them per token
        (set ``.tokens`` inside when the count is known only at the end, as for decoding)."""
        kind = kind or pass_kind(new_tokens)
        n = self.governor.choose(kind) if self.config.thread_policy == "adaptive" else self.config.threads
        if self.torch.get_num_threads() != n:
            self.torch.set_num_threads(n)
        step = ForwardPass(kind=kind, threads=n, tokens=new_tokens)
        paused = getattr(self._paused, "seconds", 0.0)
        t0 = time.perf_counter()
        yield step
        took = time.perf_counter() - t0 - (getattr(self._paused, "seconds", 0.0) - paused)
        self.governor.record(kind, n, step.tokens, took)

    @staticmethod
    def score_priority() -> Priority:
        """The level of a score pass on this thread: ``SCORE`` unless the request goes on to explain."""
        return Priority.BACKGROUND if priority_var.get() >= Priority.BACKGROUND else Priority.SCORE

    @contextmanager
    def scoring(self) -> Iterator[None]:
        """Hold the model lock for a score pass, ahead of background passes and decoding steps waiting for it."""
        with self._lock.hold(self.score_priority()):
            yield

    @contextmanager
    def decoding_step(self) -> Iterator[None]:
        """Hold the model lock for one decoding step, after every score pass that is waiting for it."""
        with self._lock.hold(Priority.DECODE):
            yield

    # --- scoring -------------------------------------------------------------------------------------------
    def ranker_model(self, adapter: str | None) -> Any:
        """The base model, or a copy with the LoRA adapter in folder ``adapter`` merged in (loaded once)."""
        if adapter is None:
            return self.model
        if adapter not in self._rankers:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
            try:
                merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            except Exception as exc:
                raise LLMError(f"cannot load the ranker adapter in {adapter}: {exc}") from exc
            merged.eval()
            self._hook_layers(merged)
            self._rankers[adapter] = merged
        return self._rankers[adapter]

    def _hidden(self, ids: list[int], adapter: str | None = None, first_needed: int | None = None) -> tuple[Any, int]:
        """Last hidden states of ``ids[reused:]`` and ``reused``: the KV cache of the longest prefix shared with
        the previous prompt of the same model is reused (never past ``first_needed``, the first position whose
        hidden state the caller reads)."""
        torch = self.torch
        from transformers import DynamicCache

        model = self.ranker_model(adapter)
        key = adapter or ""
        cached_ids, cache = self._caches.get(key, ([], None))
        last = len(ids) - 1 if first_needed is None else first_needed
        common = min(common_prefix(cached_ids, ids), len(ids) - 1, last)
        if cache is not None and common >= MIN_REUSE:
            excess = cache.get_seq_length() - common
            if excess > 0:
                cache.crop(-excess)
            reused = common
            if self.score_priority() == Priority.BACKGROUND:  # score passes may run (and use the shared cache)
                cache = copy.deepcopy(cache)  # while this pass waits between two layers
        else:
            cache = DynamicCache(config=model.config)
            reused = 0
        with self.threads_for(len(ids) - reused), torch.inference_mode():
            out = model.model(input_ids=torch.tensor([ids[reused:]]), cache=cache, use_cache=True)
        self._caches[key] = (list(ids), out.cache)
        self.usage.add("score", len(ids), 0, cached=reused)
        return out.last_hidden_state[0], reused

    def score_labels(self, request: ScoreRequest) -> list[float]:
        with self.scoring():
            ids = self.render(request.messages, request.answer_prefix)
            label_ids = [self.label_id(label) for label in request.labels]
            hidden, _ = self._hidden(ids)
            with self.torch.inference_mode():
                logits = self.model.lm_head(hidden[-1:]).float()[0]
            chosen = logits[label_ids]
            return [float(x) for x in self.torch.log_softmax(chosen, dim=-1)]

    def marker_positions(self, ids: Sequence[int], request: MarkerRequest) -> list[int]:
        """Positions of the marker token in ``ids``; exactly ``request.expected`` of them, or LLMError."""
        marker = self.label_id(request.marker)
        found = [i for i, t in enumerate(ids) if t == marker]
        if len(found) != request.expected:
            raise LLMError(f"prompt holds {len(found)} marker tokens {request.marker!r}, expected "
                           f"{request.expected}")
        return found

    def score_markers(self, request: MarkerRequest) -> list[float]:
        torch = self.torch
        with self.scoring():
            ids = self.render(request.messages)
            positions = self.marker_positions(ids, request)
            reads = [p - 1 for p in positions]  # the hidden state before the marker predicts it
            hidden, reused = self._hidden(ids, request.adapter, first_needed=min(reads))
            model = self.ranker_model(request.adapter)
            with torch.inference_mode():
                logits = model.lm_head(hidden[[r - reused for r in reads]]).float()
                logps = torch.log_softmax(logits, dim=-1)[:, self.label_id(request.marker)]
            return [float(x) for x in logps]

    # --- generation ----------------------------------------------------------------------------------------
    def _grammar(self, schema: dict[str, Any]) -> Any:
        import xgrammar as xgr

        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size)
                self._compiler = xgr.GrammarCompiler(info)
            self._grammars[key] = self._compiler.compile_json_schema(key, any_whitespace=False)
            if len(self._grammars) > 256:
                self._grammars.pop(next(iter(self._grammars)))
        return self._grammars[key]

    def _between_steps(self, deadline: float | None) -> Any:
        """A stopping criterion run after every decoding step of ``generate`` (called with the model lock held):
        it lets waiting score passes take the lock first, and stops the generation once ``deadline`` has passed
        (its caller has given up on it)."""
        from transformers import StoppingCriteria

        backend = self

        class BetweenSteps(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                backend._lock.yield_to_higher()
                late = deadline is not None and time.monotonic() > deadline
                return backend.torch.full((input_ids.shape[0],), late, dtype=backend.torch.bool)

        return BetweenSteps()

    def _generate(self, ids: list[int], max_tokens: int, temperature: float, processors: list[Any],
                  streamer: Any = None, repetition_penalty: float = 1.0, deadline: float | None = None) -> list[int]:
        torch = self.torch
        from transformers import StoppingCriteriaList

        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "logits_processor": processors,
                                  "pad_token_id": self.tokenizer.eos_token_id or 0,
                                  "stopping_criteria": StoppingCriteriaList([self._between_steps(deadline)])}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if streamer is not None:
            kwargs["streamer"] = streamer
        if repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = repetition_penalty
        with self.threads_for(max_tokens, kind="decode") as step, torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      **kwargs)
            new = out[0, len(ids):].tolist()
            step.tokens = max(len(new), 1)
        self.usage.add("generate", len(ids), len(new))
        return list(new)

    def generate_json(self, messages: list[ChatMessage], schema: dict[str, Any], max_tokens: int = 512,
                      temperature: float = 0.0) -> str:
        from xgrammar.contrib.hf import LogitsProcessor

        with self._lock.hold(Priority.DECODE):
            ids = self.render(messages)
            processor = LogitsProcessor(self._grammar(schema))
            new = self._generate(ids, max_tokens, temperature, [processor], repetition_penalty=1.3,
                                 deadline=deadline_var.get())
            text = str(self.tokenizer.decode(new, skip_special_tokens=True))
        return text

    def stream_text(self, messages: list[ChatMessage], max_tokens: int = 256,
                    temperature: float = 0.0) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
        errors: list[BaseException] = []
        deadline = deadline_var.get()

        def run() -> None:
            try:
                with self._lock.hold(Priority.DECODE):
                    self._generate(self.render(messages), max_tokens, temperature, [], streamer=streamer,
                                   deadline=deadline)
            except BaseException as exc:  # surfaced to the consumer below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
        if errors:
            raise LLMError(f"generation failed: {errors[0]}") from errors[0]

    # --- batched short continuations -----------------------------------------------------------------------
    def _banned_sequences(self, request: TextRequest) -> list[list[int]]:
        """Token sequences ``request`` must never decode: each banned word as tokenized after a space or not, in
        lower case or capitalised."""
        seqs: list[list[int]] = []
        for word in request.banned:
            if word not in self._word_ids:
                self._word_ids[word] = [self.tokenizer(v, add_special_tokens=False)["input_ids"]
                                        for v in word_variants(word)]
            seqs += self._word_ids[word]
        return seqs

    def _digit_tokens(self) -> Any:
        """Ids of every token holding a digit (one vocabulary scan, kept as a tensor)."""
        if self._digit_ids is None:
            vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._digit_ids = self.torch.tensor([i for i, t in enumerate(vocab) if t and any(c.isdigit() for c in t)])
        return self._digit_ids

    def _bans(self, request: TextRequest, sequences: list[list[int]], new: list[int]) -> list[int]:
        """Tokens the next step of one row must not take: the last token of a banned word whose other tokens
        were just written, and a token that would repeat a trigram already written (digits: :meth:`_digit_tokens`,
        applied as one tensor)."""
        out = [seq[-1] for seq in sequences if len(seq) == 1 or new[len(new) - len(seq) + 1:] == seq[:-1]]
        if len(new) >= 2:
            last = new[-2:]
            out += [new[i + 2] for i in range(len(new) - 2) if new[i:i + 2] == last]
        return out

    def _prefix_cache(self, prefix: list[int]) -> tuple[Any, int]:
        """A KV cache holding ``prefix`` (batch 1), and how many of its tokens came from the previous call's
        prefix (the static instructions at least), which is kept for the next call."""
        from transformers import DynamicCache

        torch = self.torch
        cached_ids, cached = self._caches.get("complete", ([], None))
        common = common_prefix(cached_ids, prefix)
        if cached is not None and common >= MIN_REUSE:
            cache = copy.deepcopy(cached)
            excess = cache.get_seq_length() - common
            if excess > 0:
                cache.crop(-excess)
        else:
            cache, common = DynamicCache(config=self.model.config), 0
        if len(prefix) > common:
            with self.decoding_step(), self.threads_for(len(prefix) - common), torch.inference_mode():
                self.model(input_ids=torch.tensor([prefix[common:]]), cache=cache, use_cache=True, logits_to_keep=1)
        self._caches["complete"] = (list(prefix), copy.deepcopy(cache))
        return cache, common

    def complete(self, request: TextRequest) -> str:
        return next(text for _, text in self.complete_batch([request]))

    def complete_batch(self, requests: Sequence[TextRequest],
                       cancelled: Callable[[], bool] | None = None) -> Iterator[tuple[int, str]]:
        """Greedy decoding of all ``requests`` as one batch over their shared prompt prefix (see the module
        docstring); each request is yielded as soon as it stops."""
        if not requests:
            return
        torch = self.torch
        seqs = [self.render(r.messages, r.answer_prefix) for r in requests]
        shared = shared_prefix(seqs)
        prefix, suffixes = seqs[0][:shared], [s[shared:] for s in seqs]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        stop_ids = {t for t in (self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
                    if isinstance(t, int) and t >= 0}
        rows = list(range(len(requests)))  # request index of each batch row still decoding
        new: list[list[int]] = [[] for _ in requests]
        width = max(len(s) for s in suffixes)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes])
        mask = torch.tensor([[1] * shared + [0] * (width - len(s)) + [1] * len(s) for s in suffixes])
        positions = torch.tensor([[shared] * (width - len(s)) + list(range(shared, shared + len(s)))
                                  for s in suffixes])
        next_pos = torch.tensor([shared + len(s) for s in suffixes])
        cache, reused = self._prefix_cache(prefix)
        if cache.get_seq_length() > 0 or shared:
            cache.batch_repeat_interleave(len(requests))
        self.usage.add("reason", shared, 0, cached=reused)
        banned = [self._banned_sequences(r) for r in requests]
        steps = max(r.max_tokens for r in requests)
        deadline = deadline_var.get()
        for _ in range(steps + 1):
            if (cancelled is not None and cancelled()) or (deadline is not None and time.monotonic() > deadline):
                return
            # the rows' own prompt tokens go in chunks of about SUFFIX_CHUNK tokens, one lock hold each (score
            # passes go first between chunks, and between layers); then one token per row per step
            width = ids.shape[1]
            chunk = max(1, SUFFIX_CHUNK // max(1, ids.shape[0]))
            for start in range(0, width, chunk):
                end = min(width, start + chunk)
                if start and ((cancelled is not None and cancelled()) or
                              (deadline is not None and time.monotonic() > deadline)):
                    return
                # the threads are chosen per kind of pass: a chunk of prompt tokens as a pass of its size, a step of
                # one token for one row or for many rows as its own kind (their best thread counts differ)
                tokens = int(ids[:, start:end].numel())
                kind = None if end - start > 1 else "decode" if tokens == 1 else "decode-batch"
                with self.decoding_step(), self.threads_for(tokens, kind=kind), \
                        torch.inference_mode():
                    out = self.model(input_ids=ids[:, start:end], attention_mask=mask[:, : mask.shape[1] - width + end],
                                     position_ids=positions[:, start:end], cache=cache, use_cache=True,
                                     logits_to_keep=1)
            logits = out.logits[:, -1].float().clone()
            for row, index in enumerate(rows):
                ban = self._bans(requests[index], banned[index], new[index])
                if ban:
                    logits[row, ban] = float("-inf")
                if requests[index].no_digits:
                    logits[row, self._digit_tokens()] = float("-inf")
            chosen = logits.argmax(-1).tolist()
            keep: list[int] = []
            for row, (index, token) in enumerate(zip(rows, chosen, strict=True)):
                request = requests[index]
                text, stopped = cut_at_stop(str(self.tokenizer.decode(new[index], skip_special_tokens=True)),
                                            request.stop)
                if not stopped and token not in stop_ids and len(new[index]) < request.max_tokens:
                    new[index].append(token)
                    keep.append(row)
                    continue
                self.usage.add("reason", len(seqs[index]) - shared, len(new[index]))
                yield index, text.strip()
            if not keep:
                return
            if len(keep) < len(rows):
                cache.batch_select_indices(torch.tensor(keep))
                mask, next_pos = mask[keep], next_pos[keep]
                rows = [rows[r] for r in keep]
            ids = torch.tensor([[new[index][-1]] for index in rows])
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            positions = next_pos[:, None].clone()
            next_pos = next_pos + 1
