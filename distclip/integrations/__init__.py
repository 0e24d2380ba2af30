"""Adapters that put distclip inside the trainers people actually use.

Nothing is imported here: ``import distclip`` and ``import distclip.integrations`` never import a
trainer. Import the adapter you need:

- ``distclip.integrations.lightning.GradientClipping``: a Lightning ``Callback`` (needs ``lightning``).
- ``distclip.integrations.torchtitan.clip_grad_norm_``: torchtitan's signature, a one-import swap.
- ``distclip.integrations.transformers.GradientClipping``: a Hugging Face ``TrainerCallback``
  (needs ``transformers``).

Accelerate needs no adapter: see the README's "Integrations" section.
"""

__all__: list[str] = []
