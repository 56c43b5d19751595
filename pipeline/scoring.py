"""Reward-model scores and response log-probabilities, batched (reward, ppo, eval) or packed
(copy decoding), and the precision copy decoding scores in."""
from __future__ import annotations

from contextlib import contextmanager


def reward_scores(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """One scalar per full conversation (prompt messages + the assistant's answer)."""
    import torch

    scores: list[float] = []
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False)
                 for c in conversations[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            scores += model(**batch).logits[:, 0].float().tolist()
    return scores


def answer_logprobs(model, tokenizer, prompts: list[list[dict]] | list[str], answers: list[str],
                    batch_size: int = 8, desc: str | None = None) -> list[float]:
    """Sum of log p(answer tokens | prompt) under ``model``, teacher-forced; one per answer.

    A prompt is chat messages (the chat template and the assistant's turn are applied) or
    plain text (continued as is). Rows are left-padded with explicit position ids, so every answer ends at the last
    position and the vocabulary projection runs only over the answer positions."""
    import torch
    from tqdm.auto import tqdm

    totals: list[float] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None):
        rows = []
        for prompt, answer in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
            head = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=False)
            head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            rows.append((head_ids, answer_ids))
        width = max(len(h) + len(a) for h, a in rows)
        keep = max(len(a) for _, a in rows) + 1
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(rows), width), pad)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        answer_mask = torch.zeros((len(rows), width))
        for i, (head_ids, answer_ids) in enumerate(rows):
            seq = head_ids + answer_ids
            ids[i, width - len(seq):] = torch.tensor(seq)
            attention[i, width - len(seq):] = 1
            answer_mask[i, width - len(answer_ids):] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        ids, attention, positions = ids.to(model.device), attention.to(model.device), positions.to(model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                           logits_to_keep=keep).logits[:, :-1].float()
        targets = ids[:, width - keep + 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        totals += (logp * answer_mask[:, width - keep + 1:].to(logp.device)).sum(1).tolist()
    return totals


def packed_answer_logprobs(model, tokenizer, prompts: list[str], answers: list[str]) -> list[float]:
    """``answer_logprobs`` of plain-text prompts in one forward pass without padding.

    The rows are laid end to end in a single sequence whose position ids restart at each row;
    with no attention mask and no cache, transformers reads that as packed sequences and lets
    each token attend only within its own row. Only the answer positions reach the vocabulary
    projection. Copy decoding scores eight candidate sentences a question this way: their 366
    tokens padded to the longest row were 534 (docs/results.md)."""
    import torch

    ids: list[int] = []
    positions: list[int] = []
    keep: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"]
        start = len(ids) + len(head)
        ids += head + tail
        positions += range(len(head) + len(tail))
        keep += range(start - 1, start + len(tail) - 1)  # each position predicts the next token
        targets += tail
        rows += [row] * len(tail)
    device = model.device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                       logits_to_keep=torch.tensor(keep, device=device), use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets, device=device).unsqueeze(-1)).squeeze(-1)
    totals = torch.zeros(len(prompts), dtype=torch.float64, device=device)
    return totals.index_add_(0, torch.tensor(rows, device=device), logp.double()).tolist()


def text_perplexity(model, tokenizer, texts: list[str], max_tokens: int = 256) -> float:
    """exp(mean token negative log-likelihood) of plain texts (no chat template)."""
    import math

    import torch

    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens].to(model.device)
        if ids.shape[1] < 2:
            continue
        with torch.inference_mode():
            loss = model(input_ids=ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count) if count else float("nan")


def is_fp32(model) -> bool:
    """Whether every floating-point weight and buffer of ``model`` is fp32 (the fp32 path)."""
    import itertools

    import torch

    return all(t.dtype == torch.float32 for t in itertools.chain(model.parameters(), model.buffers())
               if t.is_floating_point())


@contextmanager
def scoring_precision(model):
    """Copy decoding's question likelihood (pipeline/copying.py) of an fp32 model on a CPU in
    bf16 autocast, where the CPU multiplies bf16 natively; in fp32 elsewhere (emulated bf16 is
    slower than fp32). The service's int8-decode path reads every prompt in bf16 there too. On a
    2-core AMD EPYC with AVX512-BF16 the likelihoods of 12 eval questions' candidates took 0.27 s
    a question against 0.78 s in fp32, at most 0.034 apart in mean token log-probability, with
    the same most likely sentence for all 12 (session 19, docs/results.md). Not the refusal
    score: free decoding's prefill computes it again and must agree. Models on another numeric
    path run as they are."""
    import torch

    from pipeline import cpu

    native = cpu.has_native_bf16() and next(model.parameters()).device.type == "cpu" and is_fp32(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native):
        yield
