"""distill: full fine-tuning of a pruned decoder toward the dense model's next-token distributions.

The pass's name, options and docs are declared in :mod:`passes.distill`; this is what runs it.
"""

from __future__ import annotations

from dataclasses import replace

from compress.plan import PlanStep
from passes._common import training_ids
from passes.distill import Distill

ARTIFACT = "distill"


def block_parameter_names(model, adapter) -> list[str]:
    """Names (in ``model``) of every parameter of the decoder blocks, sorted."""
    from compress.training import module_names

    prefix = module_names(model, [adapter.layers])[0] + "."
    return sorted(name for name, _ in model.named_parameters() if name.startswith(prefix))


class DistillPass(Distill):
    """Runs the ``distill`` pass (declared by :class:`passes.distill.Distill`)."""

    def __init__(self, options: "DistillPass.Options"):
        self.options = options

    def run(self, ctx) -> PlanStep:
        from compress.calibration.sources import window_bos
        from compress.training import model_state_digest, run_fingerprint, train_weights

        o = self.options
        names = block_parameter_names(ctx.model, ctx.adapter())
        ids = training_ids(ctx, o.source, self.name, parts=bool(o.balance))
        train = replace(o.train_spec(), bos=window_bos(ctx.tokenizer))
        teacher = ctx.dense_model()
        fingerprint = run_fingerprint(ctx.model, ids, names, train, {"teacher": model_state_digest(teacher)})
        result = train_weights(ctx.model, ids, names, train, checkpoint_dir=o.checkpoint_folder(fingerprint),
                               checkpoint_every=o.checkpoint_every, fingerprint=fingerprint, progress=ctx.progress,
                               description="distillation", teacher=teacher)
        params = dict(ctx.model.named_parameters())
        weights = {name: params[name].detach().to("cpu").clone().contiguous() for name in names}
        details = {**result.summary(), "trained_tensors": len(names)}
        return PlanStep(self.name, o.model_dump(), layers=[], artifacts={ARTIFACT: weights}, details=details)

    @staticmethod
    def replay(model, step: PlanStep) -> None:
        """``compress apply``: copy the saved trained weights into the (pruned) model."""
        import torch

        from compress.errors import PlanError

        if ARTIFACT not in step.artifacts:
            raise PlanError(f"the distill step has no {ARTIFACT!r} artifact (the trained weights)")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in sorted(step.artifacts[ARTIFACT].items()):
                if name not in params:
                    raise PlanError(f"the distill step names parameter {name!r}, which this model does not have")
                if tuple(value.shape) != tuple(params[name].shape):
                    raise PlanError(f"the distill step's {name} is {tuple(value.shape)}, the model's "
                                    f"{tuple(params[name].shape)}")
                params[name].copy_(value.to(params[name].device, params[name].dtype))
