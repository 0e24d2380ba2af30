"""The small real models every layout is built from, their data and loss, and their gradients on
one process (the float64 reference a layout's gathered gradients must match).

Every model is seeded, so each rank (and the single-process reference) builds the same weights;
every vocabulary row occurs in each batch, so no gradient is exactly zero and p <= 0 means
something.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HIDDEN, OUT = 16, 8, 24, 2  # OUT=2 rows: at 4 ranks, some FSDP shards are empty
BATCH, SEQ = 4, 8  # SEQ divisible by 4: sequence parallelism shards it evenly


class Block(nn.Module):
    """embedding -> MLP residual -> LayerNorm -> head; small, with every common parameter kind."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, OUT)

    def trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return x + self.fc2(F.gelu(self.fc1(x)))

    def top(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(tokens))


class PreNormBlock(Block):
    """The same parameters as Block in the pre-norm order sequence parallelism needs:
    embed -> x + fc2(gelu(fc1(norm(x)))) -> head."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean() * 100.0  # x100: norms well above 1, so clipping happens


def batch(device: torch.device, seed: int = 1234) -> torch.Tensor:
    """Random tokens in which every vocabulary row occurs: no embedding row gets an exact-zero
    gradient, so the p <= 0 references (min |g|, count of non-zeros, negative p) are not trivial."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH * SEQ,), generator=g)
    tokens[torch.randperm(BATCH * SEQ, generator=g)[:VOCAB]] = torch.arange(VOCAB)
    return tokens.view(BATCH, SEQ).to(device)


def new_model(device: torch.device) -> Block:
    torch.manual_seed(0)
    return Block().to(device)


def grad_of(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None  # every parameter of these reference models gets a grad
    return p.grad


def single_process_grads(device: torch.device, tied: bool = False) -> dict[str, torch.Tensor]:
    """Block's gradients on one process (with ``tied``: its head replaced by one tied to the
    embedding, as the tied pipeline layouts have it)."""
    model = new_model(device)
    if tied:
        model.head = nn.Linear(DIM, VOCAB, bias=False).to(device)
        model.head.weight = model.embed.weight
    loss_of(model(batch(device))).backward()
    return {n: grad_of(p).detach().double().cpu() for n, p in model.named_parameters()}


class MoE(nn.Module):
    """Dense trunk plus NUM_EXPERTS experts spread unevenly over the expert-parallel group."""

    NUM_EXPERTS = 3

    def __init__(self, device: torch.device, owned: list[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dense = nn.Linear(DIM, DIM).to(device)
        experts = [nn.Linear(DIM, DIM).to(device) for _ in range(self.NUM_EXPERTS)]
        self.experts = nn.ModuleDict({str(e): experts[e] for e in owned})
        self.embed = nn.Embedding(VOCAB, DIM).to(device)

    def forward(self, tokens: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        x = self.dense(self.embed(tokens))
        route, routed = tokens % self.NUM_EXPERTS, x.detach()  # experts do not backprop into the trunk
        y = torch.zeros_like(x)
        for e, expert in self.experts.items():
            y = y + (route == int(e)).unsqueeze(-1) * expert(routed)
        if group is not None:  # combine the experts of all ranks; each expert's grad stays local
            combined = y.detach().clone()
            dist.all_reduce(combined, group=group)
            y = y + (combined - y.detach())
        return x + y


def expert_owner(expert: int, world: int) -> int:
    return expert % world  # 3 experts on 4 ranks: rank 3 holds none; on 2 ranks: 2 + 1


def moe_reference_grads(device: torch.device) -> dict[str, torch.Tensor]:
    """The MoE with every expert on one process (no expert-parallel group)."""
    reference = MoE(device, list(range(MoE.NUM_EXPERTS)))
    loss_of(reference(batch(device), None)).backward()
    return {n: grad_of(p).detach().double().cpu() for n, p in reference.named_parameters()}


class LoRABlock(nn.Module):
    """A frozen Linear(16, 16) plus a trainable rank-2 adapter Linear(16, 2): in one FSDP1 flat
    parameter of 304 elements the 32 trainable ones come last, so at 4 ranks only the last rank's
    shard holds any of them."""

    WIDTH, RANK = 16, 2

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(self.WIDTH, self.WIDTH)
        self.frozen.requires_grad_(False)
        self.adapter = nn.Linear(self.WIDTH, self.RANK, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.adapter(x).repeat_interleave(self.WIDTH // self.RANK, dim=-1)
        return x + torch.tanh(self.frozen(x) + up)


class LoRA(nn.Module):
    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(LoRABlock() for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def lora_input(device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(4321)
    return torch.randn(BATCH, SEQ, LoRABlock.WIDTH, generator=g).to(device)
