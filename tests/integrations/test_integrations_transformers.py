"""distclip's Hugging Face ``Trainer`` callback with a real ``Trainer`` on 2 CPU ranks (gloo, DDP).

A tiny Llama built from a config (no download) with a PEFT LoRA adapter (random A and B, so both
get gradients), gradient accumulation over 2 micro-batches, 3 optimizer steps clipped below the
norm. Every rank records the sample ids its collator saw; the test replays the same optimizer
steps in one process in float64 with torch's clip and compares every norm, the logged values and
the trained adapter weights. The same world checks the refusal of ``max_grad_norm > 0`` and
(with a CPU ``GradScaler``) that the callback unscales before measuring, once.
"""

import os

import pytest
import torch

from harness import run_world

if os.environ.get("DISTCLIP_REQUIRE_INTEGRATIONS") == "1":
    import peft  # noqa: F401  - in CI a missing package is a failure, not a skip
    import transformers  # noqa: F401
else:
    pytest.importorskip("transformers", reason="transformers is not installed (pip install 'distclip[transformers]')")
    pytest.importorskip("peft", reason="peft is not installed (pip install 'distclip[transformers]')")

VOCAB, SEQ, SAMPLES, BATCH, ACCUM, STEPS, MAX_NORM, LR = 64, 8, 48, 2, 2, 3, 0.05, 0.5


def _model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=SEQ, tie_word_embeddings=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(config), lora)


def _tokens():
    return torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        return i


class _Collate:
    """Records the sample ids of every micro-batch this rank trains on, in order."""

    def __init__(self):
        self.seen = []

    def __call__(self, ids):
        self.seen.append(list(ids))
        tokens = _tokens()[ids]
        return {"input_ids": tokens, "labels": tokens.clone()}


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=out, use_cpu=True, ddp_backend="gloo", per_device_train_batch_size=BATCH,
                gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant",
                weight_decay=0.0, optim="sgd", logging_steps=1, save_strategy="no", report_to="none",
                disable_tqdm=True, dataloader_num_workers=0, seed=0, max_grad_norm=0.0)
    # optim="sgd": the clip coefficient shows in every update (Adam's normalisation would hide it)
    return TrainingArguments(**{**base, **kw})


def _scaler_check(rank):
    """An Accelerate-style optimizer wrapper (``.optimizer``, ``.scaler``) with an enabled CPU
    GradScaler: the callback measures the unscaled grads, whether or not they were unscaled before."""
    from types import SimpleNamespace

    from torch import nn

    from distclip.integrations.transformers import GradientClipping

    results = []
    for already_unscaled in (False, True):
        torch.manual_seed(3)
        net = nn.Linear(4, 3)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(net(torch.randn(5, 4)).square().sum()).backward()
        true = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net.parameters()]).double() / 1024.0).item()
        if already_unscaled:
            scaler.unscale_(opt)
        cb = GradientClipping(max_norm=1e9)
        cb.on_pre_optimizer_step(SimpleNamespace(), SimpleNamespace(global_step=0), None, model=net,
                                 optimizer=SimpleNamespace(optimizer=opt, scaler=scaler))
        results.append((float(cb.last_norm), true))
    return results


def trainer_world(rank, world, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
    from transformers import Trainer, TrainerCallback

    from distclip.integrations.transformers import GradientClipping

    # The Trainer's own clipping on (its default max_grad_norm=1.0) beside the callback: refused.
    try:
        Trainer(model=_model(), args=_args(os.path.join(out, "refused"), max_grad_norm=1.0), train_dataset=_Data(),
                data_collator=_Collate(), callbacks=[GradientClipping(MAX_NORM)]).train()
        refused = "no error"
    except ValueError as e:
        refused = str(e)

    collate = _Collate()
    clip = GradientClipping(MAX_NORM, log_group_norms=True)
    norms = []

    class Record(TrainerCallback):  # after distclip's callback: the norm it left
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            norms.append(float(clip.last_norm))

    trainer = Trainer(model=_model(), args=_args(os.path.join(out, "run")), train_dataset=_Data(), data_collator=collate,
                      callbacks=[clip, Record()])
    trainer.train()
    # plain lists: a tensor sent through the result queue lives in shared memory that dies with this process
    adapter = {n: p.detach().double().tolist() for n, p in trainer.model.named_parameters() if p.requires_grad}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"refused": refused, "norms": norms, "seen": collate.seen, "logs": logs, "adapter": adapter,
            "scaler": _scaler_check(rank)}


def test_trainer_callback_with_lora_ddp_and_accumulation(tmp_path):
    world = 2
    results = run_world(trainer_world, world, str(tmp_path), timeout=600)
    r0 = results[0]
    for r in results:
        assert "max_grad_norm=0" in r["refused"], r["refused"]
        for ours, true in r["scaler"]:
            assert ours == pytest.approx(true, rel=1e-6)
    assert len(r0["norms"]) == STEPS and all(n > MAX_NORM for n in r0["norms"]), r0["norms"]
    assert results[1]["norms"] == r0["norms"]

    # one process, float64, torch's clip: optimizer step s saw micro-batches ACCUM*s .. ACCUM*s+ACCUM-1
    # of every rank; equal-length sequences, so the Trainer's token-averaged loss is the loss of the union
    model = _model().double()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=LR)
    tokens = _tokens()
    reference = []
    for s in range(STEPS):
        ids = [i for r in results for batch in r["seen"][s * ACCUM : (s + 1) * ACCUM] for i in batch]
        assert len(ids) == world * ACCUM * BATCH, results[0]["seen"]
        opt.zero_grad()
        model(input_ids=tokens[ids], labels=tokens[ids]).loss.backward()
        reference.append(float(torch.nn.utils.clip_grad_norm_(trainable, MAX_NORM)))
        opt.step()
    assert r0["norms"] == pytest.approx(reference, rel=1e-5), (r0["norms"], reference)
    for name, p in model.named_parameters():
        if p.requires_grad:
            for r in results:
                torch.testing.assert_close(torch.tensor(r["adapter"][name], dtype=torch.float64), p.detach(), rtol=1e-4, atol=1e-6, msg=name)

    # the Trainer's logs carry distclip's norm (replacing its own) and one entry per adapter weight
    assert [h["grad_norm"] for h in r0["logs"]] == pytest.approx(r0["norms"], rel=1e-6)
    per_name = {k: v for k, v in r0["logs"][-1].items() if k.startswith("grad_norm/")}
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(per_name) == sorted(f"grad_norm/{n.removeprefix('base_model.model.')}" for n in lora_names), per_name
    assert sum(v * v for v in per_name.values()) ** 0.5 == pytest.approx(r0["norms"][-1], rel=1e-5)


def test_import_distclip_imports_no_transformers():
    import subprocess
    import sys

    code = ("import sys, distclip, distclip.integrations; "
            "bad = [m for m in ('transformers', 'peft') if m in sys.modules]; assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_bad_arguments_are_refused_at_construction():
    from distclip.integrations.transformers import GradientClipping

    with pytest.raises(TypeError, match="max_norm must be a number"):
        GradientClipping("1.0")
    with pytest.raises(ValueError, match="non-negative"):
        GradientClipping(-1.0)


def test_attach_puts_the_callback_first_and_only_training_logs_change():
    from types import SimpleNamespace

    from distclip.integrations.transformers import GradientClipping, attach

    cb = GradientClipping(1.0)
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=["flow", "wandb", cb, "progress"]))
    assert attach(trainer, cb) is cb and trainer.callback_handler.callbacks == [cb, "flow", "wandb", "progress"]
    cb.last_norm, cb._last_step = torch.tensor(0.25), 7
    history = [{"loss": 1.0, "grad_norm": 9.0, "step": 7}]
    state = SimpleNamespace(global_step=7, log_history=history)
    evaluation = {"eval_loss": 1.0}
    cb.on_log(None, state, None, logs=evaluation)
    assert evaluation == {"eval_loss": 1.0}
    logs = {"loss": 1.0, "grad_norm": 9.0}
    cb.on_log(None, state, None, logs=logs)
    assert logs["grad_norm"] == 0.25 and history[-1]["grad_norm"] == 0.25
    state.global_step = 8  # a log of a later step than the last clip: left alone
    stale = {"loss": 1.0, "grad_norm": 9.0}
    cb.on_log(None, state, None, logs=stale)
    assert stale["grad_norm"] == 9.0
