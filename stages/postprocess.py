"""Stage 5 — postprocess: trained network -> deployable inference model.

Rewrites the trained network into its inference architecture (eval mode, dropout removed,
BatchNorm folded, normalisation baked in, test-time augmentation where validation says it
helps, optional int8), exports it with `torch.export` to models/inference.pt2, proves on the
validation set that it computes what the trained model computes, measures size and latency, and
registers it in the MLflow registry.
"""

import os

import torch

from deep_repro import data, inference, tracking, training
from deep_repro.config.stage_view import load_stage_config
from deep_repro.errors import DataError, entrypoint
from deep_repro.files import atomic_path, write_json
from deep_repro.inference import fast_program
from deep_repro.models.registry import build_model, count_parameters
from deep_repro.paths import repo_root
from deep_repro.pipeline import CHECKPOINT, INFERENCE_MODEL, POSTPROCESS_REPORT, SPLIT_TRAIN_VAL


@entrypoint
def main() -> None:
    cfg = load_stage_config("postprocess")
    root = repo_root()
    checkpoint = root / CHECKPOINT
    state = inference.load_checkpoint(checkpoint)
    net = build_model(cfg.model)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(
            f"{checkpoint} does not match model = {cfg.model.name} "
            f"({str(exc).splitlines()[0]}); retrain with `dvc repro train`"
        ) from None
    tv = data.load_arrays(root / SPLIT_TRAIN_VAL)
    x_val, y_val = tv["x_val"], tv["y_val"]
    with tracking.stage_run("postprocess", cfg) as run:
        training.seed_everything(cfg.seed, num_threads=cfg.train.num_threads)
        pp = cfg.postprocess
        tta = training.choose_tta(net.eval(), x_val, y_val, pp.tta)  # decided on val only
        module = inference.build_inference_module(net, pp.quantize, tta.tta)
        reference = tta.reference
        target = root / INFERENCE_MODEL
        with atomic_path(target) as tmp:
            inference.export(module, torch.from_numpy(x_val[:2]), tmp)
            program = inference.load_exported_program(tmp)  # through the safe-archive check
            exported = program.module()
            eq = inference.check_equivalence(
                reference,
                inference.predict_logits(exported, x_val),
                y_val,
                quantize=pp.quantize,
                atol=pp.atol,
                max_acc_drop=pp.int8_max_acc_drop,
            )
        report = {
            "file_bytes": os.path.getsize(target),
            "parameters": count_parameters(net),
            "quantize": pp.quantize,
            "tta": tta.tta,
            "tta_rule": tta.rule,
            "val_accuracy_without_tta": round(tta.val_accuracy["none"], 6),
            **{
                f"val_accuracy_with_{name}": round(acc, 6)
                for name, acc in tta.val_accuracy.items()
                if name != "none"
            },
            "max_abs_logit_diff": float(f"{eq.max_abs_diff:.3g}"),
            "val_accuracy_trained": round(eq.reference_accuracy, 6),
            "val_accuracy_exported": round(eq.exported_accuracy, 6),
        }
        write_json(root / POSTPROCESS_REPORT, report)
        # Serving: leave `deep-repro predict`'s verified fast-start copy of this very program in
        # its (untracked) cache, so the first prediction after `dvc repro` is as fast as the next.
        fast_program.warm(target, program, fast_program.default_cache())
        # Latency varies run to run: MLflow only, never in a DVC-tracked file.
        latency = {
            f"latency_ms_batch{b}": 1e3 * inference.measure_latency(exported, x_val, b, repeats)
            for b, repeats in ((1, 20), (256, 5))
        }
        run.log_metrics({k: v for k, v in report.items() if not isinstance(v, str)} | latency)
        version = tracking.log_inference_model(run, target, x_val[:4], cfg.tracking.model_name)
        run.set_tags({"registered_model": f"{cfg.tracking.model_name}/{version}", "tta": tta.tta})


if __name__ == "__main__":
    main()
