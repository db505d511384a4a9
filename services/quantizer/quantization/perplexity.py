"""Perplexity (token-level NLL) and greedy generations, for any artifact.

The validation texts are tokenized once, with the merged model's tokenizer, and the same token
ids are scored by every artifact (transformers for merged/AWQ/GPTQ checkpoints, llama.cpp for
GGUF), so the numbers compare like with like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.quantizer.quantization.data import ChatRecords, render


@dataclass(frozen=True)
class EvalSet:
    """Token ids to score, and prompts to answer greedily."""

    sequences: list[list[int]]
    prompts: list[list[int]]
    prompt_texts: list[str]

    @property
    def tokens(self) -> int:
        return sum(max(len(s) - 1, 0) for s in self.sequences)


def build_eval_set(
    tokenizer: Any, records: ChatRecords, *, max_tokens: int, generations: int
) -> EvalSet:
    sequences = []
    for messages in records.conversations:
        ids = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
        if len(ids) >= 2:
            sequences.append(list(ids[:max_tokens]))
    prompts, texts = [], []
    for messages in records.conversations[:generations]:
        text = render(tokenizer, messages, prompt_only=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_tokens:]
        if ids:
            prompts.append(list(ids))
            texts.append(text)
    return EvalSet(sequences=sequences, prompts=prompts, prompt_texts=texts)


class Scorer(Protocol):
    def nll(self, sequence: list[int]) -> float:
        """Summed next-token negative log-likelihood of ``sequence`` (len-1 predictions)."""

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]: ...


@dataclass(frozen=True)
class Quality:
    perplexity: float
    tokens: int
    generations: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "generations": self.generations,
        }


def measure(scorer: Scorer, evalset: EvalSet, tokenizer: Any, *, max_new_tokens: int) -> Quality:
    total, count = 0.0, 0
    for seq in evalset.sequences:
        total += scorer.nll(seq)
        count += len(seq) - 1
    if count == 0:
        raise ValueError("nothing to score: every validation sequence is shorter than 2 tokens")
    ppl = math.exp(total / count)
    if not math.isfinite(ppl):
        ppl = float("inf")
    gens = [
        tokenizer.decode(scorer.greedy(p, max_new_tokens), skip_special_tokens=False)
        for p in evalset.prompts
    ]
    return Quality(perplexity=ppl, tokens=count, generations=gens)


class TransformersScorer:
    """A Hugging Face causal LM (full precision, or compressed-tensors decompressed on load)."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    @classmethod
    def load(cls, path: Path) -> TransformersScorer:
        import torch
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))

    def nll(self, sequence: list[int]) -> float:
        import torch

        ids = torch.tensor([sequence])
        with torch.no_grad():
            logits = self.model(ids).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        return float(loss)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        import torch

        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        return [int(t) for t in out[0, len(prompt) :]]


class LlamaCppScorer:
    """A GGUF file through llama.cpp (llama-cpp-python's bundled libllama)."""

    def __init__(self, path: Path, *, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2
        )

    def nll(self, sequence: list[int]) -> float:
        import numpy as np

        self.llm.reset()
        self.llm.eval(sequence)
        logits = np.asarray(self.llm.scores[: len(sequence) - 1], dtype=np.float64)
        peak = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
        target = logits[np.arange(len(sequence) - 1), sequence[1:]]
        return float((logz - target).sum())

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if token == self.llm.token_eos() or len(out) >= max_new_tokens:
                break
            out.append(int(token))
        return out

    def close(self) -> None:
        self.llm.close()
