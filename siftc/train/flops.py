"""Training FLOPs, built on the one forward count (`siftc.flops.count`).

A training step costs its forward plus a backward of about twice the forward: the input gradient and the
weight gradient, both at the non-zeros for a sparse layer (the same count as its forward). RigL adds, on
each mask-update step, the dense weight gradient dL/dW = dY^T X of every sparse layer: the FLOPs of that
layer with all its weights. The dense model's training FLOPs are 3x its forward, every step.

    per step      3 * F_sparse * B
    RigL update   + sum over sparse layers of F_dense(layer) * B     (on update steps only)
    dense model   3 * F_dense_model * B per step
"""
from siftc import flops
from siftc.sparse import sparse_layers


def training_flops(model, example_inputs: tuple, batch_size: int, steps: int, scheduler=None,
                   dense_model_forward: int | None = None) -> dict:
    """FLOPs of `steps` training steps of `batch_size` items. `dense_model_forward` is the dense model's
    forward FLOPs at `example_inputs` (an artifact's report["dense_flops"]); None means `model` itself."""
    inner = getattr(model, "module", model)
    fc = flops.count(inner, example_inputs)
    per_batch = batch_size / example_inputs[0].shape[0]  # the FLOP count scales with the batch
    forward = fc.total * per_batch
    step = 3 * forward
    sparse = sparse_layers(inner)
    dense_grad = sum(fc.dense.get(name, 0) for name in sparse) * per_batch
    updates = len(scheduler.update_steps()) if scheduler is not None and scheduler.needs_dense_grad else 0
    total = steps * step + updates * dense_grad
    dense_fwd = (fc.total if dense_model_forward is None else dense_model_forward) * per_batch
    dense_total = 3 * dense_fwd * steps
    return {
        "forward_per_step": int(forward),
        "train_per_step": int(step),
        "dense_grad_per_update": int(dense_grad),
        "dense_grad_steps": updates,
        "total": int(total),
        "dense_model_total": int(dense_total),
        "ratio_to_dense": total / dense_total if dense_total else 1.0,
    }
