"""SFT, reward and DPO stages on a tiny hand-built model (TRL's real trainers, no downloads)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import SMALL_DOCS, write_lora_variant
from pipeline.artifacts import Artifacts, file_digest
from pipeline.runner import run_pipeline

QA = [
    {"id": f"adam-{i}", "question": q, "answer": a, "doc": "adam.md", "facts": [[f]]}
    for i, (q, a, f) in enumerate([
        ("Who proposed Adam?", "Diederik Kingma and Jimmy Ba.", "Kingma"),
        ("When was Adam proposed?", "In 2014.", "2014"),
        ("What is Adam's beta1?", "beta1 = 0.9.", "0.9"),
        ("What is Adam's beta2?", "beta2 = 0.999.", "0.999"),
    ])
] + [
    {"id": "drop-1", "question": "What dropout rate did the paper use?", "answer": "p = 0.5.",
     "doc": "dropout.md", "facts": [["0.5"]]},
    {"id": "drop-2", "question": "What does dropout zero?", "answer": "Each unit, with probability p.",
     "doc": "dropout.md", "facts": [["unit"]]},
] + [{"id": f"none-{i}", "question": q, "answer": None, "doc": None, "facts": []}
     for i, q in enumerate(["What is the capital of Mars?", "Who won the 2030 cup?", "What is BLEU?"])]

SHORT = ["sft.max_steps=2", "sft.batch_size=2", "sft.grad_accum=1", "sft.max_length=256",
         "sft.learning_rate=0.01", "sft.bf16=false", "sft.logging_steps=1",
         "dataset.on_policy_negatives=2", "dataset.on_policy_max_new_tokens=4",
         "dataset.validation_share=0.3", "dataset.max_refusal_share=0", "retrieval.top_k=2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    from pipeline.config import load_config

    root = tmp_path_factory.mktemp("align")
    (root / "docs").mkdir()
    (root / "qa").mkdir()
    for name, text in SMALL_DOCS.items():
        (root / "docs" / name).write_text(text)
    (root / "qa" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in QA) + "\n")

    def config(*overrides):
        return load_config("tiny", [f"paths.artifacts={root / 'artifacts'}", f"paths.reports={root / 'reports'}",
                                    f"paths.docs={root / 'docs'}", f"paths.qa={root / 'qa'}",
                                    f"base.model={tiny_model_dir}", *SHORT, *overrides])

    cfg = config()
    for stage in ("base", "index", "reader", "dataset"):
        run_pipeline(cfg, only=stage)
    return root, config


@pytest.mark.slow
def test_dataset_builds_grounded_sets(workspace):
    root, _ = workspace
    folder = root / "artifacts" / "dataset"
    sft = [json.loads(line) for line in (folder / "sft.jsonl").read_text().splitlines()]
    sft_val = [json.loads(line) for line in (folder / "sft_val.jsonl").read_text().splitlines()]
    assert {r["id"].removesuffix("-drill") for r in sft + sft_val} == {r["id"] for r in QA}
    by_id = {r["id"]: r for r in sft + sft_val}
    # evidence-first: the gold passage's own sentence, copied, with its number
    adam = by_id["adam-0"]["completion"][0]["content"]
    assert adam.startswith("Adam was proposed by Diederik Kingma and Jimmy Ba in 2014 [") and adam.endswith("].")
    number = int(adam.split("[")[1].split("]")[0])
    assert f"[{number}] (Adam" in by_id["adam-0"]["prompt"][-1]["content"]
    assert by_id["none-0"]["completion"][0]["content"] == "The provided documents do not contain the answer."
    # every prompt, refusals included, shows all k = 2 passages: no shortcut serving never has
    assert all(r["prompt"][-1]["content"].count("\n[2] (") == 1 for r in sft + sft_val)
    prefs = [json.loads(line) for line in (folder / "prefs.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    kinds = [p["kind"] for p in prefs]
    assert kinds.count("false_refusal") == kinds.count("invented_answer") > 0, kinds  # balanced
    meta = json.loads((folder / "meta.json").read_text())["metrics"]
    assert meta["records"] == len(QA) and sum(meta["pair_kinds"].values()) == meta["prefs_rows"]


def test_evidence_answer_copies_the_fewest_sentences_holding_every_fact():
    from pipeline.stages.dataset import evidence_answer

    shown = "Adam adapts step sizes. It was proposed by Kingma and Ba. They published it in 2014. It is popular."
    assert evidence_answer(shown, [["Kingma"]]) == "It was proposed by Kingma and Ba."
    assert evidence_answer(shown, [["Kingma"], ["2014"]]) == (
        "It was proposed by Kingma and Ba. They published it in 2014.")
    assert evidence_answer(shown, [["Kingma"], ["2014"]], max_sentences=1) is None
    assert evidence_answer(shown, [["Hinton"]]) is None


def test_hard_negatives_keep_k_passages_from_other_documents():
    from types import SimpleNamespace

    from pipeline.stages.dataset import hard_negatives

    def passage(doc, text):
        return SimpleNamespace(doc_id=doc, text=text)

    found = [passage("adam.md", "Kingma and Ba."), passage("sgd.md", "SGD steps."),
             passage("adam.md", "Adam defaults."), passage("rms.md", "RMSProp, Kingma cited."),
             passage("mom.md", "Momentum."), passage("lr.md", "Schedules.")]
    retriever = SimpleNamespace(search=lambda query, k: found[:k])
    record = SimpleNamespace(question="Who proposed Adam?", history=[], doc="adam.md", facts=[["Kingma"]])
    negatives = hard_negatives(record, retriever, 3, 6)
    assert [p.doc_id for p in negatives] == ["sgd.md", "mom.md", "lr.md"]  # rms.md holds the fact
    assert hard_negatives(record, retriever, 4, 6) is None  # too few: no drill with fewer passages


def test_refusal_cap_keeps_answers_and_bounds_the_share():
    import random

    from pipeline.prompt import REFUSAL
    from pipeline.stages.dataset import cap_refusals

    rows = [{"completion": [{"content": REFUSAL}]}] * 10 + [{"completion": [{"content": f"a{i}"}]} for i in range(8)]
    assert cap_refusals(rows, 0.2, random.Random(0)) == 8  # 2 refusals left: 2 / (2 + 8) = 0.2
    assert len(rows) == 10 and sum(r["completion"][0]["content"] == REFUSAL for r in rows) == 2
    assert cap_refusals(rows, 0.0, random.Random(0)) == 0 and len(rows) == 10


@pytest.mark.slow
def test_sft_moves_only_the_lora_weights(workspace):
    root, config = workspace
    base_digest = file_digest(root / "artifacts/base/model.safetensors")
    metrics = run_pipeline(config(), only="sft")["sft"]
    from safetensors.torch import load_file

    adapter = load_file(root / "artifacts/sft/adapter/adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter), "only adapter weights are saved"
    assert all(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n), "B starts at 0: it must move"
    assert file_digest(root / "artifacts/base/model.safetensors") == base_digest
    assert math.isfinite(metrics["train_loss"]) and metrics["steps"] == 2
    assert metrics["held_out_loss_base"] > 0 and (root / "reports/sft_loss.png").stat().st_size > 1000


def test_answer_loss_equals_the_full_loss_on_the_answer_positions(tiny_model_dir):
    """The sft stage projects only answer positions through the LM head; the loss and the
    gradients must be those of the model's own loss over every position (fast: tiny model)."""
    from transformers import AutoModelForCausalLM

    from pipeline.stages.sft import answer_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0  # a right-padded row
    labels = input_ids.clone()
    labels[0, :8] = labels[1, :5] = labels[2, :6] = -100  # prompts differ in length
    labels[2, 9:] = -100
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    ours, outputs = answer_loss(model, inputs)
    assert outputs.logits.shape[1] == 11 - 4, "logits only from the first answer-predicting column on"
    ours.backward()
    ours_grad = model.model.layers[0].mlp.down_proj.weight.grad.clone()
    model.zero_grad()
    full = model(**inputs).loss
    full.backward()
    assert ours.item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(ours_grad, model.model.layers[0].mlp.down_proj.weight.grad, atol=1e-6)
    halved, _ = answer_loss(model, inputs, num_items_in_batch=2 * int((labels[:, 1:] != -100).sum()))
    assert halved.item() == pytest.approx(full.item() / 2, rel=1e-5), "a global token count divides the sum"


def test_dpo_head_scores_answer_positions_as_trl_does(tiny_model_dir):
    """The dpo stage's LM head scores only labelled positions; its log-probs, their gradients
    and the logged entropy, mean logit and top-1 hits must be TRL's fused head's (fast)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.stages.dpo import answer_positions_head

    trl_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ours_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    add_fused_lm_head(trl_model, outputs=outputs)
    add_fused_lm_head(ours_model, outputs=outputs)
    answer_positions_head(ours_model)
    torch.manual_seed(0)
    input_ids = torch.randint(3, trl_model.config.vocab_size, (4, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[3, :3] = 0  # a left-padded row
    labels = input_ids.clone()
    labels[:, :6] = -100
    labels[1, :8] = -100  # answers differ in length
    got = {}
    for name, model in (("trl", trl_model), ("ours", ours_model)):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        got[name] = out, model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    (trl, trl_grad), (ours, ours_grad) = got["trl"], got["ours"]
    labelled = labels[:, 1:] != -100
    assert (ours.log_probs[~labelled] == 0).all() and (ours.log_probs[labelled] != 0).all()
    for field in ("log_probs", "entropy", "mean_logits"):
        assert torch.allclose(getattr(ours, field), getattr(trl, field), atol=1e-5), field
    assert torch.equal(ours.is_top1, trl.is_top1) and ours.loss.item() == pytest.approx(trl.loss.item(), rel=1e-5)
    assert torch.allclose(ours_grad, trl_grad, atol=1e-6)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """-log sigmoid(beta * ((pc - rc) - (pr - rr))) (Rafailov et al. 2023)."""
    return -torch.nn.functional.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))


@pytest.mark.slow
def test_dpo_loss_by_hand_and_in_trl(workspace, tiny_model_dir):
    # by hand: log-ratios +1 (chosen) and -1 (rejected), beta 0.1 -> -log sigmoid(0.2)
    by_hand = math.log(1 + math.exp(-0.2))
    assert dpo_loss(torch.tensor(-10.0), torch.tensor(-12.0), torch.tensor(-11.0), torch.tensor(-11.0),
                    0.1).item() == pytest.approx(by_hand)
    assert by_hand == pytest.approx(0.59814, abs=1e-5)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from pipeline.stages.dpo import answer_positions_trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # make the two models differ, so the loss is not log 2
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                                "chosen": [{"role": "assistant", "content": "hello"}],
                                "rejected": [{"role": "assistant", "content": "go away"}]}])
    args = DPOConfig(output_dir=str(workspace[0] / "dpo-check"), beta=0.1, report_to=[], use_cpu=True,
                     per_device_train_batch_size=1, max_length=64, bf16=False)
    trainer = answer_positions_trainer()(model=policy, ref_model=reference, args=args, train_dataset=pairs,
                                         processing_class=tokenizer)  # the dpo stage's trainer
    batch = trainer.data_collator([trainer.train_dataset[0]])
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, batch).item()

    def completion_logp(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        return (logp * batch["completion_mask"][:, 1:]).sum(1)  # rows: chosen, then rejected

    with torch.no_grad():
        pol, ref = completion_logp(policy), completion_logp(reference)
    assert loss == pytest.approx(dpo_loss(pol[0], pol[1], ref[0], ref[1], 0.1).item(), rel=1e-4)
    assert abs(loss - math.log(2)) > 1e-4


@pytest.mark.slow
def test_reward_model_ranks_a_separable_toy_set(workspace):
    root, config = workspace
    artifacts = Artifacts(root / "artifacts")
    write_lora_variant(root / "artifacts", "sft", ["sft"])
    toy = root / "toy-dataset"
    toy.mkdir(exist_ok=True)

    def pair(i, good, bad):
        prompt = [{"role": "user", "content": f"question {i}"}]
        return {"id": f"t{i}", "kind": "toy", "prompt": prompt,
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}]}

    rows = [pair(i, "yes " * (1 + i % 3), "no " * (1 + i % 3)) for i in range(24)]
    (toy / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:16]) + "\n")
    (toy / "prefs_val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[16:]) + "\n")
    Artifacts.write_meta(toy, {"stage": "dataset", "fingerprint": "toy", "metrics": {}})
    real = artifacts.dir("dataset")
    real.rename(root / "real-dataset")
    toy.rename(real)
    try:
        metrics = run_pipeline(config("reward.max_steps=30", "reward.learning_rate=0.01", "reward.batch_size=4",
                                      "reward.grad_accum=1", "reward.max_length=64", "reward.bf16=false",
                                      "reward.eval_rows=0"), only="reward")["reward"]
    finally:
        real.rename(toy)
        (root / "real-dataset").rename(real)
    assert metrics["held_out_pairs"] == 8 and metrics["held_out_accuracy"] == 1.0, metrics
    assert metrics["margin_min"] > 0


@pytest.mark.slow
def test_dpo_stage_trains_a_new_adapter_on_sft(workspace):
    root, config = workspace
    if not (root / "artifacts/sft/meta.json").exists():
        run_pipeline(config(), only="sft")
    from pipeline.data.feedback import FeedbackStore, export_pairs

    store = FeedbackStore(root / "feedback.sqlite")
    row = store.record("sft", [{"role": "user", "content": "Who proposed Adam?"}], "Hinton.", -1, "Kingma and Ba [1].")
    store.set_review([row], "approved")
    assert export_pairs(store, root / "feedback.jsonl") == 1
    train_rows = len((root / "artifacts/dataset/prefs.jsonl").read_text().splitlines())
    metrics = run_pipeline(config("dpo.max_steps=2", "dpo.batch_size=1", "dpo.grad_accum=1",
                                  "dpo.max_length=1500", "dpo.bf16=false",
                                  f"dpo.extra_prefs={root / 'feedback.jsonl'}"), only="dpo")["dpo"]
    assert metrics["adapter_chain"] == ["sft", "dpo"] and metrics["steps"] == 2
    assert metrics["train_pairs"] == train_rows + 1, "exported chat feedback joins the DPO pairs"
    from safetensors.torch import load_file

    adapter = load_file(root / "artifacts/dpo/adapter/adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n), "B starts at 0: it must move"
    assert metrics["refusal_threshold"] is not None and 0 <= metrics["dev_abstention"] <= 1
