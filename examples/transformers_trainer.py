"""Hugging Face ``Trainer`` + PEFT LoRA, clipped by distclip's callback.

    torchrun --standalone --nproc_per_node=2 examples/transformers_trainer.py [--steps 3]

A tiny Llama built from a config (nothing is downloaded) with a LoRA adapter, trained by the
``Trainer`` under DDP (on CPU: ``use_cpu=True, ddp_backend="gloo"``) with gradient accumulation.
The ``Trainer``'s own clipping is off (``max_grad_norm=0``); ``GradientClipping`` clips once per
optimizer step and puts its norm (and, with ``log_group_norms=True``, one norm per adapter
weight) into the ``Trainer``'s logs. Rank 0 replays the same steps in one process in float64 with
torch's clip and checks every norm.
"""

import argparse
import gc
import os
import tempfile
import warnings

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from distclip.integrations.transformers import GradientClipping

VOCAB, SEQ, SAMPLES, BATCH, ACCUM, MAX_NORM, LR = 64, 8, 64, 2, 2, 0.05, 0.5


def new_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=SEQ, tie_word_embeddings=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(config), lora)


def tokens():
    return torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))


class Collate:
    """Causal-LM batches from sample ids; keeps the ids of each micro-batch (for the reference)."""

    def __init__(self):
        self.seen = []

    def __call__(self, ids):
        self.seen.append(list(ids))
        batch = tokens()[ids]
        return {"input_ids": batch, "labels": batch.clone()}


class RecordNorms(TrainerCallback):
    def __init__(self, clip):
        self.clip, self.norms = clip, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # runs after GradientClipping's
        self.norms.append(float(self.clip.last_norm))


def one_process_norms(seen_per_rank, steps):
    """The same optimizer steps in one process, float64: step ``s`` saw micro-batches
    ``ACCUM*s .. ACCUM*s+ACCUM-1`` of every rank; sequences of one length, so the ``Trainer``'s
    token-averaged loss over them is the loss of their union."""
    model = new_model().double()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=LR)
    data, norms = tokens(), []
    for s in range(steps):
        ids = [i for seen in seen_per_rank for batch in seen[s * ACCUM : (s + 1) * ACCUM] for i in batch]
        opt.zero_grad()
        model(input_ids=data[ids], labels=data[ids]).loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, MAX_NORM)))
        opt.step()
    return norms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # transformers' own deprecation notice about PEFT's call into it: nothing to do with clipping
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")

    clip = GradientClipping(max_norm=MAX_NORM, log_group_norms=True)
    record, collate = RecordNorms(clip), Collate()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, use_cpu=True, ddp_backend="gloo",   # on GPUs: drop both (NCCL)
            per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, max_steps=args.steps,
            optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
            max_grad_norm=0,                                    # the Trainer's own clipping off: distclip clips
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            ddp_find_unused_parameters=False,
        )
        trainer = Trainer(model=new_model(), args=training_args, train_dataset=list(range(SAMPLES)), data_collator=collate,
                          callbacks=[clip, record])
        trainer.train()

    rank, world = dist.get_rank(), dist.get_world_size()
    every_rank = [None] * world
    dist.all_gather_object(every_rank, (record.norms, collate.seen))
    assert all(norms == record.norms for norms, _ in every_rank), f"norms differ across ranks: {every_rank}"
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    logged = [h["grad_norm"] for h in train_logs]
    assert logged == record.norms, (logged, record.norms)  # the Trainer's logs carry distclip's norm
    if rank == 0:
        print(f"distclip grad norms {[round(n, 6) for n in record.norms]} (identical on all {world} ranks, = the logged grad_norm)")
        per_weight = sorted(k for k in train_logs[-1] if k.startswith("grad_norm/"))
        print(f"logged per adapter weight: {len(per_weight)} entries, e.g. {per_weight[0]}")
        reference = one_process_norms([seen for _, seen in every_rank], args.steps)
        print(f"one-process float64 reference (torch's clip): {[round(n, 6) for n in reference]}")
        for ours, ref in zip(record.norms, reference):
            assert abs(ours - ref) <= 1e-5 * ref, (record.norms, reference)
        print("OK: transformers_trainer")
    # The Trainer's DDP model is freed while its process group still exists, and every rank is done
    # with gloo before any rank tears it down (a gloo teardown race, as in examples/fsdp1.py).
    del trainer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
