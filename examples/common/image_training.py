"""What train_ebm and train_ncsn share: a resumable, data-parallel training run on images
(:func:`train`) and the ending on rank 0 (:func:`sample_and_report`)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import torch

from . import loop
from .checkpoint import (
    CKPT_NAME,
    check_resume_args,
    resume_or_none,
    save_checkpoint,
    save_json,
)
from .distributed import (
    Dist,
    average_gradients,
    gather_model,
    load_state,
    optimizer_state,
    replicate,
)
from .seeding import batch_indices, set_rng_state, step_generator


def train(*, args: argparse.Namespace, parser: argparse.ArgumentParser, d: Dist,
          model: torch.nn.Module, train_data: torch.Tensor,
          loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Generator], torch.Tensor],
          eval_fn: Callable[[torch.nn.Module], float], use_ddp_hooks: bool = True,
          log: Callable = print) -> tuple[dict, float]:
    """Run (or, with ``args.resume``, continue) training. Returns ``(history,
    seconds_per_iteration)``; history = {"train": [(step, loss)], "eval": [(step, value)]}.

    loss_fn(net, x, generator) -> scalar loss, ``net`` the (possibly DDP-wrapped) model.
    eval_fn(model) -> held-out loss (rank 0 only). use_ddp_hooks: wrap in
    DistributedDataParallel (the FD losses: a forward and an ordinary backward); False
    all-reduces the gradients by hand (double-backward losses, whose
    torch.autograd.grad(create_graph=True) DDP does not support). ``args.fsdp`` (several
    processes): train an FSDP2-sharded copy instead of DDP (FD losses only); ``model`` then
    receives the trained parameters for evaluation, checkpoints and on return.
    """
    fsdp = getattr(args, "fsdp", False)
    if fsdp and not use_ddp_hooks:
        parser.error("--fsdp: this --method needs a double backward, which FSDP2 does not "
                     "support; use an FD method")
    model.to(d.device)
    net = replicate(model, d, use_ddp_hooks, fsdp)  # FSDP: before the optimizer sees net
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    history: dict = {"train": [], "eval": []}
    start = 0
    ckpt_path = os.path.join(args.out, CKPT_NAME)
    found = (resume_or_none(parser, args.out, d.device, is_main=d.is_main, log=log)
             if args.resume else None)
    if found is not None:
        state, loaded_path = found
        check_resume_args(parser, state["args"], args)
        load_state(model, net, optimizer, state["model"], state["optimizer"])
        history, start = state["history"], state["step"]
        set_rng_state(state["rng"])
        if d.is_main:
            log(f"resumed from {loaded_path} at step {start}")
    elif args.resume and d.is_main:
        log(f"--resume: no checkpoint at {ckpt_path}, starting from step 0")
    timing = {"seconds": 0.0, "steps": 0}

    def step(i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        x = train_data[batch_indices(len(train_data), args.batch_size, i, args.seed, d)]
        loss = loss_fn(net, x.to(d.device, non_blocking=True),
                       step_generator(args.seed, d.rank, i, d.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not use_ddp_hooks:
            average_gradients(model, d)
        optimizer.step()
        value = float(loss.detach())
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        timing["seconds"] += time.perf_counter() - t0
        timing["steps"] += 1
        history["train"].append((i + 1, value))
        return {"loss": value}

    # Under FSDP every rank runs evaluate and checkpoint up to the gathers (collectives).
    def evaluate(done: int) -> None:
        gather_model(model, net)
        if d.is_main:
            model.eval()
            history["eval"].append((done, float(eval_fn(model))))
            model.train()

    def checkpoint(done: int) -> None:
        gather_model(model, net)
        optim_state = optimizer_state(net, optimizer)
        if d.is_main:
            save_checkpoint(ckpt_path, model=model, optimizer=optim_state, step=done,
                            history=history, args=args)

    if start == 0 and args.steps > 0 and not history["eval"]:
        evaluate(0)
    try:
        loop.run(step, start=start, stop=args.steps, desc="train",
                 progress=not args.no_progress and d.is_main,
                 hooks=[loop.Hook(args.eval_every, evaluate, at_end=True),
                        loop.Hook(args.ckpt_every, checkpoint, at_end=True)])
    except loop.NonFiniteLoss as e:
        if d.is_main:
            print(f"error: {e}; try a smaller --lr (or a larger --eps / --sigma)",
                  file=sys.stderr)
        sys.exit(1)
    # --steps 0, or nothing left to do. Not decided by the file alone: rank 0 may still be
    # writing the last step's checkpoint while another rank looks.
    if start >= args.steps and not os.path.exists(ckpt_path):
        checkpoint(max(start, args.steps))
    gather_model(model, net)
    return history, (timing["seconds"] / timing["steps"] if timing["steps"] else float("nan"))


def sample_and_report(*, args: argparse.Namespace, model: torch.nn.Module,
                      sigmas: torch.Tensor, d: Dist, output: str, title: str, history: dict,
                      train_label: str, eval_label: str, eval_key: str, test_x: torch.Tensor,
                      sec_per_iter: float, mem: dict, max_diff: float, extra: dict) -> dict:
    """Annealed Langevin samples from uniform noise, then samples.png, curves.png and
    metrics.json (``extra`` holds the script's own settings). Returns the metrics."""
    from fdsm_ext import annealed_langevin_dynamics

    from . import classifier, metrics

    model.eval()
    g = torch.Generator(device=d.device).manual_seed(args.seed + 99)
    x0 = torch.rand((args.n_samples, *test_x.shape[1:]), generator=g, device=d.device)
    t0 = time.perf_counter()
    samples = annealed_langevin_dynamics(model, x0, sigmas, args.n_steps_each, args.step_lr,
                                         condition=args.condition, output=output,
                                         denoise=True, generator=g,
                                         progress=not args.no_progress)
    sample_time = time.perf_counter() - t0
    samples = samples.detach().cpu()
    metrics.save_image_grid(os.path.join(args.out, "samples.png"), samples[:100], title=title)
    metrics.save_curves(os.path.join(args.out, "curves.png"), history,
                        train_label=train_label, eval_label=eval_label)
    result = {
        "method": args.method, "dataset": args.dataset, "steps": args.steps,
        "batch_size": args.batch_size, "world_size": d.world_size,
        "fsdp": bool(getattr(args, "fsdp", False)) and d.enabled, "eps": args.eps,
        "sigmas": sigmas.tolist(), "n_steps_each": args.n_steps_each, "step_lr": args.step_lr,
        **extra,
        eval_key: history["eval"][-1][1] if history["eval"] else None,
        "final_train_loss": history["train"][-1][1] if history["train"] else None,
        "seconds_per_iteration": sec_per_iter,
        "sampling_seconds": sample_time,
        **mem,
        **metrics.mmd_report(samples, x0.cpu(), test_x),
        **classifier.classifier_report(args.dataset, args.data_dir, samples, x0.cpu(), test_x),
        "samples_finite": bool(torch.isfinite(samples).all()),
        "ranks_max_param_difference": max_diff,
        "torch_threads": torch.get_num_threads(),
    }
    save_json(os.path.join(args.out, "metrics.json"), result)

    def fmt(v):
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.4g}"

    print(f"{eval_key} {fmt(result[eval_key])}, {fmt(1000 * sec_per_iter)} ms/iter, MMD^2 "
          f"samples {fmt(result['mmd2_samples_vs_heldout'])} vs initial noise "
          f"{fmt(result['mmd2_init_noise_vs_heldout'])}; wrote {args.out}/")
    return result
