"""The training loop as named steps: build the run, resume it, train an epoch, validate, save.

:class:`Trainer` builds everything a run needs from the parsed flags (models, data, distiller,
optimizer, schedule, EMA, mixup), restores a checkpoint when resuming, and :meth:`Trainer.run`
trains epoch by epoch. Under torchrun the distiller (the student and what it trains besides;
the teacher is not a registered submodule) is wrapped once in DistributedDataParallel; rank 0
logs and saves. A checkpoint holds everything an exact resume needs, mid-epoch included: the
per-rank RNG states, the scheduler, and the running loss sums of the interrupted epoch.
"""
import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..distill import DISTILLERS, total_loss
from .checkpoint import load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state
from .data import DataConfig, build_dataset, dataset_info
from .distributed import Distributed
from .errors import CheckpointError, CorruptImageError, DataError, DivergedError, UsageError
from .evaluate import evaluate
from .models import build_teacher, create_model, distiller_from_args
from .resume import check_resume_args
from .rundir import Logger, append_summary, default_run_dir, format_seconds, plain, trim_summary, write_config
from .sampling import build_loader, build_mixup, mixing_active
from .teacher_cache import TeacherCache, batch_rows, run_fields, teacher_output_to


RUN_RESULTS = ("last.pth", "best.pth", "summary.csv")  # what a run directory holds that --output must not destroy
RUN_FILES = RUN_RESULTS + ("config.yaml", "log.txt")


@dataclass
class Progress:
    """Where a run stands: epochs completed, steps into the next one, and the best evaluation so far."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None


class Trainer:
    """One training run, built from parsed flags; :meth:`run` trains it to the end (or to a stop)."""

    def __init__(self, args: argparse.Namespace, ddp: Distributed):
        self.args, self.ddp, self.device = args, ddp, ddp.device
        self.job_start = time.perf_counter()
        resume_state = load_checkpoint(args.resume, "--resume") if args.resume else None
        changed_flags = check_resume_args(resume_state.get("args") or {}, plain(vars(args))) if resume_state else []
        self.run_dir = self._open_run_dir()
        self.log = Logger(ddp.main, self.run_dir / "log.txt")
        if changed_flags:
            self.log(f"resuming with changed flags: {'; '.join(changed_flags)}")
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        self.data_config = DataConfig.from_namespace(args)
        self.info = dataset_info(self.data_config)
        student, teacher = self._build_models()
        self._build_data()
        self._build_distiller(student, teacher)
        self.teacher_cache = self._open_teacher_cache(teacher)
        self._build_optimization()
        self.progress, self.partial, self.last_eval = Progress(), None, {}
        if resume_state is not None:
            self.resume(resume_state)
        self.model = self._wrap(self.distiller)
        self._seed_step_rngs((resume_state or {}).get("rng"))
        self.run_steps, self.run_train_seconds = 0, 0.0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._log_start()

    # ------------------------------------------------------------------------------------------ building

    def _open_run_dir(self) -> Path:
        args = self.args
        if args.output:
            run_dir = Path(args.output)
        elif args.resume:
            run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        else:
            run_dir = default_run_dir(args.distiller, args.model)
        existing = [] if args.resume else [name for name in RUN_FILES if (run_dir / name).exists()]
        results = [name for name in existing if name in RUN_RESULTS]
        if results and not args.overwrite:
            raise UsageError(f"--output {run_dir}: holds a run ({', '.join(results)}); continue it with "
                             f"--resume {run_dir}, choose another --output, or pass --overwrite to replace it")
        self.ddp.barrier()  # every rank has looked before rank 0 writes
        if self.ddp.main:
            for name in existing:  # a run replaced (--overwrite), or one that died before its first checkpoint
                (run_dir / name).unlink()
        if self.ddp.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(run_dir, args)
        return run_dir

    def _build_models(self):
        """The student (with its initial checkpoint) and, for distillation, the frozen teacher."""
        args, info = self.args, self.info
        student = create_model(args.model, args.model_kwargs, info.num_classes, info.in_chans, args.img_size,
                               "--model", drop_rate=args.drop or None, drop_path_rate=args.drop_path)
        if args.initial_checkpoint:
            load_weights(student, args.initial_checkpoint, "--initial-checkpoint", "student")
        if not args.teacher or not DISTILLERS[args.distiller].needs_teacher:
            return student, None
        return student, build_teacher(args, info, self.log)  # --teacher-pretrained / -checkpoint, --use-ema-teacher

    def _build_data(self) -> None:
        args, ddp = self.args, self.ddp
        self.train_set = build_dataset(self.data_config, self.info, "train")
        self.eval_set = build_dataset(self.data_config, self.info, "eval")
        pin = self.device.type == "cuda"
        self.train_loader = build_loader(self.train_set, args.batch_size, True, args.workers, args.seed, ddp.rank,
                                         ddp.world_size, pin, aug_repeats=args.aug_repeats)
        self.eval_loader = build_loader(self.eval_set, args.eval_batch_size or 2 * args.batch_size, False,
                                        args.workers, args.seed, ddp.rank, ddp.world_size, pin)
        self.steps_per_epoch = self.train_loader.sampler.batches_per_epoch()
        if args.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, args.steps_per_epoch)

    def _build_distiller(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        args = self.args
        input_size = (self.info.in_chans, args.img_size, args.img_size)
        distiller = distiller_from_args(args, student, teacher, input_size, mixing_active(args), len(self.train_set))
        if args.sync_bn and self.ddp.enabled:
            distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
        distiller.to(self.device)
        if args.channels_last:
            distiller.to(memory_format=torch.channels_last)  # the teacher follows (BaseDistiller._apply)
        self.distiller = distiller

    def _open_teacher_cache(self, teacher: Optional[nn.Module]) -> Optional[TeacherCache]:
        """The --teacher-cache, checked against this run: its teacher's weights, data, seed, augmentation,
        epochs and (top-k caches) the loss temperature; None without the flag."""
        if not self.args.teacher_cache:
            return None
        cache = TeacherCache(self.args.teacher_cache)
        cache.check(run_fields(self.args, teacher, len(self.train_set), self.info.num_classes, self.ddp.world_size))
        cached_t, loss_t = cache.manifest["temperature"], self.distiller.teacher_temperature
        if cache.manifest["topk"] and cached_t != loss_t:
            raise DataError(f"--teacher-cache {cache.root}: its top-k rows hold logsumexp at temperature {cached_t}, "
                            f"this run's loss reads the teacher at {loss_t}: make the cache with "
                            f"--cache-temperature {loss_t} (or a full cache, --cache-topk 0)")
        stored = f"top-{cache.manifest['topk']}" if cache.manifest["topk"] else "all logits"
        self.log(f"teacher outputs from the cache {cache.root} ({stored}, {cache.manifest['dtype']}): "
                 "the teacher does not run")
        return cache

    def _build_optimization(self) -> None:
        """Optimizer (timm's, no weight decay where the distiller says), schedule, scaler, EMA, mixup."""
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        args = self.args
        self.optimizer = create_optimizer_v2(self.distiller, opt=args.opt, lr=args.lr,
                                             weight_decay=args.weight_decay, momentum=args.momentum)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_milestones=list(args.decay_milestones), decay_rate=args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, step_on_epochs=not args.sched_on_updates,
            updates_per_epoch=self.steps_per_epoch)
        self.amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if args.amp and self.amp_dtype == torch.float16 else None
        self.ema = ModelEmaV3(self.distiller.student, decay=args.model_ema_decay,
                              use_warmup=args.model_ema_warmup) if args.model_ema else None
        self.mixup = build_mixup(args, self.info.num_classes)

    def _wrap(self, distiller: nn.Module) -> nn.Module:
        model = distiller
        if self.ddp.enabled:
            model = nn.parallel.DistributedDataParallel(
                distiller, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if self.args.compile else model

    def _seed_step_rngs(self, saved_rng: Optional[list]) -> None:
        """Per-rank RNG streams for dropout and drop-path, continued exactly on resume."""
        from timm.utils import random_seed

        if saved_rng and len(saved_rng) == self.ddp.world_size:
            set_rng_state(saved_rng[self.ddp.rank])
            return
        if saved_rng:
            self.log(f"warning: the checkpoint holds RNG states of {len(saved_rng)} processes, this run has "
                     f"{self.ddp.world_size}; reseeding")
        random_seed(self.args.seed + 1000 * self.progress.epoch, self.ddp.rank)

    def _log_start(self) -> None:
        args, ddp = self.args, self.ddp
        num_params = sum(p.numel() for p in self.distiller.parameters())
        teacher = args.teacher if self.distiller.teacher is not None else "-"
        self.log(f"run dir {self.run_dir} | {ddp.world_size} process(es) on {self.device} | {args.distiller}: "
                 f"student {args.model}, teacher {teacher} | {num_params / 1e6:.2f}M trainable | train "
                 f"{len(self.train_set)} images, eval {len(self.eval_set)} | {self.steps_per_epoch} steps/epoch of "
                 f"{args.batch_size} x {ddp.world_size}")

    def amp_context(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.args.amp else nullcontext()

    # ------------------------------------------------------------------------------------------ checkpoints

    def checkpoint_state(self, epoch_done: int, step_in_epoch: int, partial_epoch: Optional[dict] = None) -> dict:
        """Everything an exact resume needs, in plain types and tensors (``weights_only=True`` loads it)."""
        progress = Progress(epoch_done, step_in_epoch, self.progress.global_step, self.progress.best_metric,
                            self.progress.best_epoch)
        return {"model": self.distiller.student.state_dict(), "distiller": self.distiller.extra_state(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
                **asdict(progress), "metrics": dict(self.last_eval), "partial_epoch": partial_epoch,
                "arch": self.args.model, "args": {k: plain(v) for k, v in vars(self.args).items()}}

    def save(self, names: tuple, state: dict) -> None:
        """Writes `state` under each name in the run directory (rank 0), with every rank's RNG state;
        never a diverged state (:meth:`ensure_finite`)."""
        self.ensure_finite()
        rngs = self.ddp.gather(rng_state())
        if self.ddp.main:
            state["rng"] = rngs
            for name in names:
                save_checkpoint(state, self.run_dir / name)

    def resume(self, state: dict) -> None:
        """Restores the trained state, the optimizer, schedule, scaler, EMA and progress of a checkpoint."""
        try:
            self.distiller.student.load_state_dict(state["model"])
            self.distiller.load_extra_state(state.get("distiller") or {})
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None and state.get("model_ema"):
                self.ema.module.load_state_dict(state["model_ema"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"--resume {self.args.resume}: the checkpoint does not fit this run "
                                  f"({type(error).__name__}: {str(error).splitlines()[0][:300]})") from None
        self.progress = Progress(*(state[key] for key in ("epoch", "step_in_epoch", "global_step")),
                                 state.get("best_metric"), state.get("best_epoch"))
        self.partial = state.get("partial_epoch")
        self.last_eval = dict(state.get("metrics") or {})
        if self.ddp.main:
            trim_summary(self.run_dir / "summary.csv", self.progress.epoch)
        self.log(f"resumed from {self.args.resume}: epoch {self.progress.epoch}, step "
                 f"{self.progress.step_in_epoch} of {self.steps_per_epoch}")

    # ------------------------------------------------------------------------------------------ training

    def run(self) -> dict:
        """Trains the remaining epochs; returns the final metrics (on every rank)."""
        start_epoch, stopped = self.progress.epoch, False
        for epoch in range(start_epoch, self.args.epochs):
            skip = self.progress.step_in_epoch if epoch == start_epoch else 0
            if skip >= self.steps_per_epoch:
                continue
            stopped = self.train_epoch(epoch, skip)
            if stopped:
                self.log(f"stopped after step {self.progress.global_step} (--stop-after-steps); resume with "
                         f"--resume {self.run_dir}")
                break
        return self._result(stopped)

    def train_step(self, images: torch.Tensor, target: torch.Tensor, sample_index: torch.Tensor,
                   teacher_output=None) -> torch.Tensor:
        """One optimizer step; returns the detached [total, *loss entries] of this step. `teacher_output`:
        the teacher's cached output for these images (``--teacher-cache``), else the teacher runs. Mixup and
        cutmix are applied before (:meth:`train_epoch`)."""
        args = self.args
        if teacher_output is not None:
            self.distiller.use_teacher_output(teacher_output_to(teacher_output, self.device))
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        keyed = (sample_index,) if self.distiller.needs_sample_index else ()
        with self.amp_context():
            _, losses = self.model(images, target, *keyed)
        loss = total_loss(losses)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.distiller.parameters(), args.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if args.clip_grad:
                nn.utils.clip_grad_norm_(self.distiller.parameters(), args.clip_grad)
            self.optimizer.step()
        self.progress.global_step += 1
        if self.ema is not None:
            self.ema.update(self.distiller.student, step=self.progress.global_step)
        self.scheduler.step_update(self.progress.global_step)
        with torch.no_grad():
            return torch.stack([loss.detach().double()] + [losses[name].detach().double()
                                                           for name in self.distiller.loss_names])

    def train_epoch(self, epoch: int, skip: int) -> bool:
        """Trains epoch `epoch` from step `skip`; ends it (evaluation, summary, checkpoints) unless stopped.
        Returns whether ``--stop-after-steps`` stopped the run."""
        args = self.args
        self.train_loader.sampler.set_epoch(epoch, skip)
        self.scheduler.step(epoch)
        self.scheduler.step_update(self.progress.global_step)
        self.model.train()
        sums, steps_in_sums = self._epoch_sums(epoch == self.progress.epoch)
        epoch_start, step, stopped = time.perf_counter(), skip, False
        for images, target, sample_index, teacher_output in self._batches(epoch, skip):
            if step >= self.steps_per_epoch:
                break
            images, target = images.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            if self.mixup is not None:
                images, target = self.mixup(images, target, epoch, step, self.ddp.rank)
            step_losses = self.train_step(images, target, sample_index.to(self.device, non_blocking=True),
                                          teacher_output)
            sums += step_losses
            self._note_non_finite(step_losses[0])
            step, steps_in_sums, self.run_steps = step + 1, steps_in_sums + 1, self.run_steps + 1
            if step % args.log_interval == 0 or step == self.steps_per_epoch:
                self._log_progress(epoch, step, sums / steps_in_sums, epoch_start)
            stopped = bool(args.stop_after_steps and self.progress.global_step >= args.stop_after_steps)
            periodic = args.checkpoint_interval and self.progress.global_step % args.checkpoint_interval == 0
            if (stopped or periodic) and step < self.steps_per_epoch:
                self.save(("last.pth",), self.checkpoint_state(
                    epoch, step, {"sums": sums.tolist(), "steps": steps_in_sums}))
            if stopped:
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - epoch_start
        self.run_train_seconds += seconds
        if not stopped or step >= self.steps_per_epoch:
            self.end_epoch(epoch, sums, steps_in_sums, seconds, (step - skip) * args.batch_size * self.ddp.world_size,
                           stopped)
        return stopped

    def _batches(self, epoch: int, skip: int):
        """The loader's batches from step `skip` with the teacher cache's rows for them (None without a cache),
        each read in a thread while the step before it trains, so reading never holds up a step."""
        if self.teacher_cache is None:
            for batch in self.train_loader:
                yield (*batch, None)
            return
        cache, steps_per_rank = self.teacher_cache, self.train_loader.sampler.batches_per_epoch()
        with ThreadPoolExecutor(1) as reader:
            pending = None
            for step, batch in enumerate(self.train_loader, start=skip):
                rows = batch_rows(cache.manifest, batch[2], self.ddp.rank, step, steps_per_rank)
                ahead = (batch, reader.submit(cache.rows, epoch, rows))
                if pending is not None:
                    yield (*pending[0], pending[1].result())
                pending = ahead
            if pending is not None:
                yield (*pending[0], pending[1].result())

    def _epoch_sums(self, resumed_epoch: bool):
        """The running loss sums of an epoch: zeros, or the saved ones of an epoch resumed midway."""
        sums = torch.zeros(len(self.distiller.loss_names) + 1, dtype=torch.float64, device=self.device)
        partial, self.partial = self.partial, None
        if partial is not None and resumed_epoch:
            return sums + torch.tensor(partial["sums"], dtype=torch.float64, device=self.device), partial["steps"]
        return sums, 0

    def _note_non_finite(self, loss: torch.Tensor) -> None:
        """Records on the device (no host synchronisation) the first step whose loss is not finite."""
        bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, self.progress.global_step, self.first_bad_step)

    def ensure_finite(self) -> None:
        """A :class:`DivergedError` naming the step once a loss or a parameter is not finite: checked
        at every progress line and before every checkpoint, so no checkpoint holds a diverged state."""
        bad_step = int(self.first_bad_step)
        if bad_step >= 0:
            what = "the loss is not finite"
        elif torch.stack([p.isfinite().all() for p in self.distiller.parameters()]).all():
            return
        else:
            what, bad_step = "a parameter is not finite", self.progress.global_step
        epoch, step_in_epoch = divmod(bad_step - 1, self.steps_per_epoch)
        raise DivergedError(f"epoch {epoch + 1} step {step_in_epoch + 1} (step {bad_step} of the run): {what}; "
                            f"stopped before saving it (the last good checkpoint in {self.run_dir} is kept). Lower "
                            "--lr, use --clip-grad, or check the data and teacher")

    def _log_progress(self, epoch: int, step: int, mean_losses: torch.Tensor, epoch_start: float) -> None:
        self.ensure_finite()
        if self.args.quiet:
            return
        mean = mean_losses.tolist()
        images_per_step = self.args.batch_size * self.ddp.world_size
        elapsed = self.run_train_seconds + time.perf_counter() - epoch_start
        rate = self.run_steps * images_per_step / max(elapsed, 1e-9)
        remaining = (self.args.epochs * self.steps_per_epoch - self.progress.global_step) * elapsed / max(
            self.run_steps, 1)
        parts = " ".join(f"{name[5:]} {value:.4f}" for name, value in zip(self.distiller.loss_names, mean[1:]))
        self.log(f"epoch {epoch + 1}/{self.args.epochs} step {step}/{self.steps_per_epoch} loss {mean[0]:.4f} "
                 f"({parts}) lr {self.optimizer.param_groups[0]['lr']:.3g} {rate:.1f} img/s "
                 f"eta {format_seconds(remaining)}")

    # ------------------------------------------------------------------------------------------ epoch ends

    def end_epoch(self, epoch: int, sums: torch.Tensor, steps: int, seconds: float, images: int,
                  stopped: bool) -> None:
        """Mean losses over ranks, evaluation when due, the summary row, last.pth and (if better) best.pth."""
        args = self.args
        means = [v / max(steps, 1) / self.ddp.world_size for v in self.ddp.all_sum(sums).tolist()]
        epoch_done = epoch + 1
        train_metrics = {"loss": f"{means[0]:.6f}",
                         **{name: f"{value:.6f}" for name, value in zip(self.distiller.loss_names, means[1:])},
                         "img_per_sec": f"{images / max(seconds, 1e-9):.1f}", "epoch_seconds": f"{seconds:.2f}"}
        message = f"epoch {epoch_done}/{args.epochs} train loss {means[0]:.4f}"
        due = epoch_done == args.epochs or (args.eval_interval and epoch_done % args.eval_interval == 0) or stopped
        if due:  # saved before evaluating: an evaluation that fails (a corrupt image) does not cost the epoch
            self.save(("last.pth",), self.checkpoint_state(epoch_done, 0))
        eval_metrics, metric = self.validate(epoch_done) if due else (self._blank_eval(), None)
        if due:
            message += f" | eval top-1 {eval_metrics['top1']:.2f} top-5 {eval_metrics['top5']:.2f}"
            message += f" | ema top-1 {eval_metrics['ema_top1']:.2f}" if self.ema is not None else ""
        self.log(f"{message} | {train_metrics['img_per_sec']} img/s | {seconds:.1f} s")
        if self.ddp.main:
            formatted = {k: (None if v is None else f"{v:.6f}" if k == "loss" else f"{v:.3f}")
                         for k, v in eval_metrics.items()}
            append_summary(self.run_dir / "summary.csv", epoch_done, train_metrics, formatted,
                           f"{self.optimizer.param_groups[0]['lr']:.6g}")
        improved = metric is not None and (self.progress.best_metric is None or metric > self.progress.best_metric)
        if improved:
            self.progress.best_metric, self.progress.best_epoch = metric, epoch_done
        self.save(("last.pth", "best.pth") if improved else ("last.pth",), self.checkpoint_state(epoch_done, 0))

    def _blank_eval(self) -> dict:
        keys = ("loss", "top1", "top5") + (("ema_top1", "ema_top5") if self.ema is not None else ())
        return dict.fromkeys(keys)

    def validate(self, epoch_done: int):
        """The student's (and the EMA's) evaluation metrics, and the one that picks the best checkpoint."""
        ctx, channels_last = self.amp_context, self.args.channels_last
        try:
            self.last_eval = evaluate(self.distiller.student, self.eval_loader, self.device, ctx, channels_last,
                                      self.ddp)
        except CorruptImageError as error:
            raise DataError(f"evaluation split: {error}; epoch {epoch_done} is saved in {self.run_dir / 'last.pth'}: "
                            f"fix or remove the file, then --resume {self.run_dir}") from None
        metric = self.last_eval["top1"]
        if self.ema is not None:
            ema_eval = evaluate(self.ema.module, self.eval_loader, self.device, ctx, channels_last, self.ddp)
            self.last_eval.update(ema_top1=ema_eval["top1"], ema_top5=ema_eval["top5"])
            metric = ema_eval["top1"]  # as timm: the EMA's accuracy picks the best checkpoint
        return dict(self.last_eval), metric

    def _result(self, stopped: bool) -> dict:
        images = self.run_steps * self.args.batch_size * self.ddp.world_size
        progress = self.progress
        result = {"run_dir": str(self.run_dir), "global_step": progress.global_step, "stopped": stopped,
                  "epochs_done": min(progress.global_step // max(self.steps_per_epoch, 1), self.args.epochs),
                  "best_top1": progress.best_metric, "best_epoch": progress.best_epoch,
                  **{f"final_{k}": v for k, v in self.last_eval.items()}, "train_seconds": self.run_train_seconds,
                  "train_images": images, "img_per_sec": images / max(self.run_train_seconds, 1e-9),
                  "wall_seconds": time.perf_counter() - self.job_start, "distiller": self.distiller}
        best = progress.best_metric if progress.best_metric is not None else "-"
        self.log(f"done: {images} training images in {format_seconds(self.run_train_seconds)} = "
                 f"{result['img_per_sec']:.1f} img/s over {self.ddp.world_size} process(es); wall time "
                 f"{result['wall_seconds']:.1f} s; best top-1 {best} (epoch {progress.best_epoch})")
        return result


def train(args: argparse.Namespace) -> dict:
    """Runs the training job described by parsed `args`; returns its final metrics (on every rank)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp = Distributed(args.device)
    try:
        return Trainer(args, ddp).run()
    finally:
        ddp.close()
