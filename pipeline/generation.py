"""Batched greedy generation from chat messages, with a progress bar (dataset, eval, bench)."""
from __future__ import annotations

from tqdm.auto import tqdm


def generate_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96,
                   batch_size: int = 8, desc: str = "generating", repetition_penalty: float = 1.1
                   ) -> list[str]:
    """Greedy answers to each conversation (left-padded batches; deterministic)."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    for start in tqdm(range(0, len(conversations), batch_size), desc=desc, unit="batch"):
        chunk = conversations[start:start + batch_size]
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    repetition_penalty=repetition_penalty,
                                    pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers
