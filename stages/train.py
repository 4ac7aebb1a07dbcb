"""Stage 4 — train: fit the configured architecture on the train split, select on val.

Writes the checkpoint (a `state_dict`, loaded back with `weights_only=True`), the per-epoch
history (DVC plot, x = step) and summary metrics; every epoch is also an MLflow step metric.
"""

import torch

from deep_repro import data, tracking, training
from deep_repro.config.stage_view import load_stage_config
from deep_repro.errors import entrypoint
from deep_repro.files import atomic_path, write_csv, write_json
from deep_repro.models.registry import count_parameters
from deep_repro.paths import repo_root
from deep_repro.pipeline import CHECKPOINT, SPLIT_TRAIN_VAL, TRAIN_HISTORY, TRAIN_METRICS


@entrypoint
def main() -> None:
    cfg = load_stage_config("train")
    root = repo_root()
    tv = data.load_arrays(root / SPLIT_TRAIN_VAL)
    # Reject impossible settings (batch larger than the data, CUDA absent) before any work.
    training.check_trainable(cfg, len(tv["y_train"]))
    device = training.resolve_device(cfg.train)
    with tracking.stage_run("train", cfg) as run:
        for part in ("train", "val"):
            x, y = tv[f"x_{part}"], tv[f"y_{part}"]
            tracking.log_dataset(
                run,
                f"fashion-mnist-{part}",
                x,
                y,
                data.array_digest(x, y),
                str(root / SPLIT_TRAIN_VAL),
                context=part,
            )
        result = training.train_model(
            cfg,
            tv["x_train"],
            tv["y_train"],
            tv["x_val"],
            tv["y_val"],
            on_epoch=lambda m: run.log_metrics(m.as_dict(), step=m.step),
        )
        state = result.model.state_dict()
        with atomic_path(root / CHECKPOINT) as tmp:
            torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
        write_csv(
            root / TRAIN_HISTORY,
            [
                {"step": m.step, **{k: round(v, 6) for k, v in m.as_dict().items()}}
                for m in result.history
            ],
        )
        best = result.history[result.best_epoch - 1]
        summary = {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "val_accuracy": round(best.val_accuracy, 6),
            "val_loss": round(best.val_loss, 6),
            "train_accuracy": round(best.train_accuracy, 6),
            "parameters": count_parameters(result.model),
        }
        write_json(root / TRAIN_METRICS, summary)
        # The kept weights' score under its own name: a step-less `val_accuracy` would add a
        # point at step 0 to the per-epoch curve (evaluate logs the pipeline's val_accuracy).
        run.log_metrics(
            {
                "best_val_accuracy": best.val_accuracy,
                "best_epoch": result.best_epoch,
                "parameters": summary["parameters"],
            }
        )
        # The thread count in force (what `train.num_threads: auto` resolved to): results are
        # byte-identical only between runs with the same count.
        run.set_tags(
            {
                "stop_reason": result.stop_reason,
                "device": str(device),
                "num_threads": str(torch.get_num_threads()),
            }
        )
        run.log_artifact(root / TRAIN_HISTORY)


if __name__ == "__main__":
    main()
