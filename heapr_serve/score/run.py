"""One calibration run of `compress`: choose how the model is held, shard over ranks, checkpoint, reduce.

- in memory (`InMemoryPass`) when the model and one batch's autograd graph fit the device and host,
  else streamed layer by layer (`StreamedPass`), said in one line; `--streamed` / `--no-streamed` force it;
- data parallel when launched by torchrun: each rank takes a disjoint share of the batches, the sums
  are all-reduced, rank 0 gets the statistics (the others get None);
- resumable: the sums are checkpointed every `checkpoint_every` batches (heapr_serve.score.checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from heapr_serve.errors import HeaprError
from heapr_serve.preflight import check_output
from heapr_serve.progress import console, progress_bar
from heapr_serve.score import distributed
from heapr_serve.score.calibration_pass import InMemoryPass
from heapr_serve.score.checkpointing import CalibrationState, calibrate_in_chunks
from heapr_serve.score.memory import batches_per_chunk, check_context, decide, estimate, fitting_flags, room_for
from heapr_serve.score.observers import MethodStatsObserver
from heapr_serve.score.stats import ExpertStats
from heapr_serve.score.streamed import StreamedPass


@dataclass
class RunOptions:
    dtype: torch.dtype
    device: torch.device
    batch_size: int
    streamed: bool | None = None  # None: decide from the memory estimate
    activations_dir: Path | None = None
    checkpoint_every: int = 8
    resume: bool = False
    overwrite: bool = False
    save_final: bool = False  # checkpoint the finished sums too (--heal: a resume then skips calibration)


def choose_streamed(source: Path, config: dict, opts: RunOptions, seq_len: int, batches_per_chunk: int,
                    nsamples: int | None = None) -> tuple[bool, str]:
    """(streamed?, the reason in words) from the estimate of what each way needs and what is free; a
    HeaprError with the estimate and the flags that would fit when neither way fits."""
    need = estimate(source, config, opts.dtype, opts.batch_size, seq_len, batches_per_chunk)
    room = room_for(opts.device, opts.activations_dir)
    world = distributed.ranks_from_env().world
    samples = nsamples if nsamples is not None else batches_per_chunk * opts.batch_size * world

    def fix() -> str:
        return fitting_flags(source, config, opts.dtype, opts.batch_size, seq_len, samples, opts.checkpoint_every, world,
                             room, opts.activations_dir)

    return decide(need, room, opts.streamed, opts.activations_dir, fix)


def check_fits(source: Path, config: dict, opts: RunOptions, seq_len: int, nsamples: int) -> None:
    """Before the tokenizer, the calibration set or the model is loaded: refuse a --seq-len past the
    model's positions, or a run that fits neither in memory nor streamed (the same estimate the run
    decides by, so it fails in a second instead of at the kernel's hands)."""
    if nsamples < 1:
        raise HeaprError(f"--nsamples must be at least 1 (got {nsamples})")
    if seq_len < 2:
        raise HeaprError(f"--seq-len must be at least 2 (got {seq_len})")
    check_context(config, seq_len, str(source / "config.json"))
    if opts.activations_dir is not None:
        check_output("--activations-dir", opts.activations_dir, merge=True)
    world = distributed.ranks_from_env().world
    choose_streamed(source, config, opts, seq_len, batches_per_chunk(nsamples, opts.batch_size, opts.checkpoint_every, world), nsamples)


def run_calibration(source: Path, config: dict, batches: list, num_tokens: list[int], loss_scale: float, out: Path,
                    identity: dict, opts: RunOptions, load_model, what: str = "calibrating", every_rank: bool = False) -> ExpertStats | None:
    """Calibrate; the statistics on rank 0, None on the other ranks (the summed statistics on every
    rank with `every_rank`, which then ends the run with `finish_run`). `num_tokens[i]` is the number of
    real tokens of batch i; `load_model(dtype, device)` loads the whole model for the in-memory pass;
    `what` describes the calibration set for the first line printed."""
    ranks = distributed.ranks_from_env()
    if len(batches) < ranks.world:
        raise HeaprError(f"{len(batches)} calibration batches for {ranks.world} ranks; give each rank one: more --nsamples or a smaller --batch-size")
    order = list(range(len(batches)))
    mine = ranks.share(order)
    state = CalibrationState(out, ranks.rank, ranks.world, identity)
    observer = MethodStatsObserver()
    done = 0
    if opts.resume:
        done, sums = state.load()
        observer.load_sums(sums)
        console.print(f"resuming from a checkpoint: {done} of {len(mine)} batches done")
    elif state.exists() and not opts.overwrite:
        raise HeaprError(f"-o {out}: an interrupted calibration for this output is checkpointed in {state.folder}; "
                         "pass --resume to continue it, or --overwrite to start again")
    elif state.exists():
        state.remove()

    longest = max(int(b[0].shape[1]) for b in batches)
    check_context(config, longest, str(source / "config.json"), f"calibration samples of {longest} tokens",
                  "shorten the --calib samples or lower --seq-len")
    streamed, how = choose_streamed(source, config, opts, longest, min(opts.checkpoint_every, len(mine)), len(batches) * opts.batch_size)
    world = f", {ranks.world} ranks" if ranks.world > 1 else ""
    if ranks.is_main:
        console.print(f"{what}, {how}{world}")
    distributed.start(ranks, opts.device)
    my_batches = [batches[i] for i in mine]
    with progress_bar() as progress:
        task = progress.add_task("HEAPr statistics", total=sum(num_tokens[i] for i in mine),
                                 completed=sum(num_tokens[i] for i in mine[:done]))
        if streamed:
            chunks = -(-(len(mine) - done) // max(1, opts.checkpoint_every))
            calibration = StreamedPass(source, opts.dtype, opts.device, opts.activations_dir)
            layers = progress.add_task("streaming layers", total=calibration.steps_per_run() * chunks)
            calibration.on_step = lambda _: progress.advance(layers)
        else:
            calibration = InMemoryPass(load_model(opts.dtype, opts.device))
        try:
            calibrate_in_chunks(calibration, my_batches, observer, loss_scale, opts.checkpoint_every, state, done,
                                lambda n: progress.advance(task, n), opts.save_final)
        except KeyboardInterrupt:
            if state.file.is_file():
                console.print(f"interrupted: the calibration is checkpointed in {state.folder}; run the same command with --resume to continue")
            raise
    distributed.all_reduce_sums(ranks, observer.sums(), opts.device)
    stats = observer.result()
    if not ranks.is_main and not every_rank:
        distributed.finish(ranks)
        return None
    return stats


def finish_run(out: Path, identity: dict) -> None:
    """After rank 0 wrote the checkpoint: drop the calibration checkpoints, release the other ranks."""
    ranks = distributed.ranks_from_env()
    distributed.finish(ranks)  # first: rank 0 may still read what the others would remove (healed layers)
    CalibrationState(out, ranks.rank, ranks.world, identity).remove()
