"""Compares the Rust EC-IJEPA model with the PyTorch reference.

Reads what `cargo run -p jepa-worker --example export_parity -- DIR` wrote,
loads the Rust weights into `reference.EcIjepaReference` with strict key
matching, feeds the same images and masks, and compares in f32:
context-encoder output, target features, predictions, loss, every
gradient, evaluation features, and the target encoder after one EMA step.
Prints the largest absolute difference of each and exits 1 if any exceeds
1e-5 (or a structural check fails). `make parity` runs it.

Usage: check_parity.py DIR
"""

import json
import pathlib
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from reference import EcIjepaReference, ema_expected, sincos_2d  # noqa: E402

TOLERANCE = 1e-5


def max_diff(a, b):
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    return (a.double() - b.double()).abs().max().item()


def check_case(out_dir, cfg, momentum, case):
    name = case["name"]
    weights = load_file(str(out_dir / f"{name}_weights.safetensors"))
    data = load_file(str(out_dir / f"{name}_data.safetensors"))
    model = EcIjepaReference(cfg, case)
    model.load_rust_weights(weights)

    # The fixed tables the Rust side stored must be the formula's.
    grid = cfg["image_size"] // cfg["patch_size"]
    diffs = {
        "pos_embed": max_diff(
            weights["encoder.pos_embed"][0], sincos_2d(cfg["embed_dim"], grid, grid)
        ),
        "predictor_pos_embed": max_diff(
            weights["predictor.predictor_pos_embed"][0], sincos_2d(cfg["pred_dim"], grid, grid)
        ),
    }

    images = data["images"]
    ctx_idx = data["context_indices"]
    target_idx = list(data["target_indices"].unbind(0))
    z, targets, pred, loss = model(images, ctx_idx, target_idx)
    loss.backward()
    diffs["context_encoder"] = max_diff(z, data["context_out"])
    diffs["target_features"] = max_diff(targets, data["targets_out"])
    diffs["predictions"] = max_diff(pred, data["predictions_out"])
    diffs["loss"] = max_diff(loss.view(1), data["loss"])

    grad_diff, grads = 0.0, 0
    for part in ("encoder", "predictor"):
        for pname, p in getattr(model, part).named_parameters():
            if not p.requires_grad:
                continue
            grad_diff = max(grad_diff, max_diff(p.grad, data[f"grad.{part}.{pname}"]))
            grads += 1
    rust_grads = sum(1 for k in data if k.startswith("grad."))
    if grads != rust_grads:
        raise AssertionError(f"{name}: {rust_grads} Rust gradients, {grads} reference ones")
    diffs["gradients"] = grad_diff

    with torch.no_grad():
        diffs["eval_features"] = max_diff(model.target_encoder(images), data["features_out"])
        ema_diff = 0.0
        context = dict(model.encoder.named_parameters())
        for pname, t in model.target_encoder.named_parameters():
            # The fixed position table stays out of the EMA on the Rust side.
            want = t if pname == "pos_embed" else ema_expected(t, context[pname], momentum)
            ema_diff = max(ema_diff, max_diff(want, data[f"ema.target_encoder.{pname}"]))
        diffs["ema"] = ema_diff

    check_token_counts(model, case, data, ctx_idx, grid * grid)
    return diffs


def check_token_counts(model, case, data, ctx_idx, patches):
    """Rust's reported sequence lengths must equal the reference's; for
    `none` they are the plain I-JEPA patch counts."""
    batch, n_ctx = ctx_idx.shape
    rust_ctx = data["context_tokens"].tolist()
    rust_tgt = data["target_tokens"].tolist()
    if case["conditioning"] == "none":
        if rust_ctx != [n_ctx] * batch or rust_tgt != [patches] * batch:
            raise AssertionError(
                f"none: token counts {rust_ctx} / {rust_tgt} are not {n_ctx} / {patches}"
            )
    with torch.no_grad():
        target_idx = list(data["target_indices"].unbind(0))
        model(data["images"], ctx_idx, target_idx)
    ref_ctx = model.encoder.last_sequence_lengths
    ref_tgt = model.target_encoder.last_sequence_lengths
    if case["conditioning"] == "none":
        ref_ctx, ref_tgt = ref_ctx * batch, ref_tgt * batch
    if ref_ctx != rust_ctx or ref_tgt != rust_tgt:
        raise AssertionError(
            f"{case['name']}: token counts Rust {rust_ctx} / {rust_tgt}, "
            f"reference {ref_ctx} / {ref_tgt}"
        )


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = pathlib.Path(sys.argv[1])
    manifest = json.loads((out_dir / "manifest.json").read_text())
    torch.set_num_threads(1)
    failed = []
    for case in manifest["cases"]:
        diffs = check_case(out_dir, manifest["model"], manifest["ema_momentum"], case)
        for quantity, diff in diffs.items():
            verdict = "ok" if diff <= TOLERANCE else "FAIL"
            print(f"parity {case['name']:<17} {quantity:<20} max abs diff {diff:.3e} {verdict}")
            if diff > TOLERANCE:
                failed.append(f"{case['name']}/{quantity}")
    if failed:
        print(f"parity failed (tolerance {TOLERANCE}): {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"parity ok: {len(manifest['cases'])} cases within {TOLERANCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
