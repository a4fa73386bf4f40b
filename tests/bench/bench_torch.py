"""Times EC-IJEPA training steps in PyTorch eager, the counterpart of
`jepa-worker bench`.

Reads the workload `jepa-worker bench --workload-out FILE` wrote (sizes,
conditioning, batch, optimiser constants, CPU threads and every step's
masks) and runs the same steps on the model of ../parity/reference.py:
target forward without gradient, context encoder, predictor, smooth-L1
loss, backward, torch.optim.AdamW step (decay and no-decay groups), EMA
update, reading the loss back. Warm-up steps are untimed, each timed step
ends with a device synchronisation, images are random and already on the
device, and index lists become tensors inside the step as they do in Rust.
Weights and images are the Rust side's (written next to the workload), so
the first loss of both sides must agree; the driver checks it.

Two changes to the reference keep the comparison about the framework, not
about the algorithm (pass --attention explicit to time the reference as it
is):
- attention uses F.scaled_dot_product_attention, as the Rust model does,
  instead of an explicit softmax;
- EC conditioning tokens are batched the way the Rust model batches them
  (padded to the largest count, padding hidden by a key mask), instead of
  running images one at a time.

On CUDA the forward runs under bf16 autocast, as in the public I-JEPA code.

Usage: bench_torch.py WORKLOAD [--attention sdpa|explicit] [--json]
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "parity"))
from reference import EcIjepaReference, gather  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def attend(attn, x, keep, explicit):
    """Multi-head attention of a reference `Attention` module over x
    [B, L, D]; keep is an optional [B, 1, 1, L] key mask."""
    b, n, d = x.shape
    hd = d // attn.heads
    qkv = attn.qkv(x).reshape(b, n, 3, attn.heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, L, hd]
    if explicit:
        scores = (q @ k.transpose(-2, -1)) * (hd**-0.5)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        out = scores.softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return attn.proj(out.transpose(1, 2).reshape(b, n, d))


def run_block(block, x, keep, explicit):
    x = x + attend(block.attn, block.norm1(x), keep, explicit)
    return x + block.mlp(block.norm2(x))


def pool_windows(positions, grid, kernel, stride):
    """Positions inside each k x k window (stride s) that holds one of
    `positions`, windows in raster order (as avg_pool2d's windows)."""
    on = np.zeros((grid, grid), dtype=bool)
    on.flat[positions] = True
    side = (grid - kernel) // stride + 1
    windows = []
    for wr in range(side):
        for wc in range(side):
            rows = slice(wr * stride, wr * stride + kernel)
            cols = slice(wc * stride, wc * stride + kernel)
            r, c = np.nonzero(on[rows, cols])
            if len(r):
                windows.append((r + wr * stride) * grid + c + wc * stride)
    return windows


def cond_tokens(encoder, per_image, kernel, stride, patches):
    """Batched conditioning tokens: ([B, K, D] position means plus the
    learned token, zero-padded to the largest count K; the [B, 1, 1, L]
    key mask, or None when every image has K tokens)."""
    device = encoder.pos_embed.device
    windows = [pool_windows(p, encoder.grid, kernel, stride) for p in per_image]
    counts = [len(w) for w in windows]
    b, k, kk = len(windows), max(counts), kernel * kernel
    index = np.zeros((b, k, kk), dtype=np.int64)
    weight = np.zeros((b, k, kk), dtype=np.float32)
    for i, image in enumerate(windows):
        for t, members in enumerate(image):
            index[i, t, : len(members)] = members
            weight[i, t, : len(members)] = 1.0 / len(members)
    table = encoder.pos_embed[0]  # [N, D]
    index = torch.from_numpy(index).to(device)
    weight = torch.from_numpy(weight).to(device)
    tokens = (table[index.view(-1)].view(b, k, kk, -1) * weight.unsqueeze(-1)).sum(2)
    if encoder.cond_token is not None:
        tokens = tokens + encoder.cond_token
    if all(c == k for c in counts):
        return tokens, None
    counts = torch.tensor(counts, device=device)
    valid = torch.arange(k, device=device).unsqueeze(0) < counts.unsqueeze(1)  # [B, K]
    keys = torch.cat([torch.ones(b, patches, dtype=torch.bool, device=device), valid], 1)
    return tokens, keys.view(b, 1, 1, -1)  # [B, 1, 1, L]


def encode(encoder, images, keep_idx, cond, explicit):
    """The reference encoder with batched conditioning: cond is None or
    (per-image position arrays, kernel, stride)."""
    x = encoder.patch_embed(images) + encoder.pos_embed  # [B, N, D]
    if keep_idx is not None:
        x = gather(x, keep_idx)  # [B, K, D]
    patches, mask = x.size(1), None
    if cond is not None:
        per_image, kernel, stride = cond
        extra, mask = cond_tokens(encoder, per_image, kernel, stride, patches)
        x = torch.cat([x, extra.to(x.dtype)], 1)  # [B, K + T, D]
    for block in encoder.blocks:
        x = run_block(block, x, mask, explicit)
    return encoder.norm(x[:, :patches])


def predict(predictor, ctx, ctx_idx, target_idx, explicit):
    """The reference predictor with the attention of `attend`."""
    b = ctx.size(0)
    pos = predictor.predictor_pos_embed.expand(b, -1, -1)
    x = predictor.predictor_embed(ctx) + gather(pos, ctx_idx)  # [B, Nc, Dp]
    n_ctx = x.size(1)
    queries = torch.cat([gather(pos, idx) for idx in target_idx], 0) + predictor.mask_token
    x = torch.cat([x.repeat(len(target_idx), 1, 1), queries], 1)  # [M*B, Nc+Nt, Dp]
    for block in predictor.predictor_blocks:
        x = run_block(block, x, None, explicit)
    return predictor.predictor_proj(predictor.predictor_norm(x)[:, n_ctx:])  # [M*B, Nt, D]


def step_loss(model, images, masks, cond, explicit, device):
    """Forward of one step: the loss, with the graph of context encoder and
    predictor."""
    ctx_np = np.asarray(masks["context"], dtype=np.int64)  # [B, Nc]
    tgt_np = np.asarray(masks["targets"], dtype=np.int64)  # [M, B, Nt]
    ctx_idx = torch.from_numpy(ctx_np).to(device)
    target_idx = list(torch.from_numpy(tgt_np).to(device).unbind(0))
    ec = cond["kind"] == "ec"
    kernel, stride = cond["kernel"], cond["stride"]
    with torch.no_grad():
        h = encode(model.target_encoder, images, None, (ctx_np, kernel, stride) if ec else None,
                   explicit)
        h = F.layer_norm(h.float(), (h.size(-1),))
        targets = torch.cat([gather(h, idx) for idx in target_idx], 0)
    unions = [np.unique(tgt_np[:, b].reshape(-1)) for b in range(ctx_np.shape[0])]
    z = encode(model.encoder, images, ctx_idx, (unions, kernel, stride) if ec else None, explicit)
    pred = predict(model.predictor, z, ctx_idx, target_idx, explicit)
    return F.smooth_l1_loss(pred.float(), targets)


def build(workload, folder, device):
    """The reference model with the Rust side's initial weights, its AdamW
    (two groups) and the EMA pairs."""
    m, c = workload["model"], workload["conditioning"]
    case = {
        "conditioning": c["kind"],
        "learned_token": c["learned_token"],
        "kernel": c["kernel"],
        "stride": c["stride"],
    }
    model = EcIjepaReference(m, case)
    model.load_rust_weights(load_file(str(folder / workload["weights"])))
    model.to(device)
    trained = [
        (n, p)
        for part in ("encoder", "predictor")
        for n, p in getattr(model, part).named_parameters()
        if p.requires_grad
    ]
    decay = [p for n, p in trained if not n.endswith(".bias") and p.dim() > 1]
    no_decay = [p for n, p in trained if n.endswith(".bias") or p.dim() <= 1]
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": workload["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=workload["lr"],
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    context = dict(model.encoder.named_parameters())
    ema = [(t, context[n]) for n, t in model.target_encoder.named_parameters() if n != "pos_embed"]
    return model, optim, ema, sum(p.numel() for _, p in trained)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", type=pathlib.Path)
    parser.add_argument("--attention", choices=["sdpa", "explicit"], default="sdpa")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    workload = json.loads(args.workload.read_text())
    device = torch.device(workload["device"])
    torch.set_num_threads(workload["threads"])
    folder = args.workload.resolve().parent
    model, optim, ema, params = build(workload, folder, device)
    images = load_file(str(folder / workload["images"]))["images"].to(device)
    cuda = device.type == "cuda"
    explicit = args.attention == "explicit"
    momentum, clip = workload["momentum"], workload["grad_clip"]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    times, losses = [], []
    for step, masks in enumerate(workload["masks"]):
        start = time.perf_counter()
        optim.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = step_loss(model, images, masks, workload["conditioning"], explicit, device)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optim.param_groups for p in g["params"]],
                                           clip)
        optim.step()
        with torch.no_grad():
            for target, source in ema:
                target.mul_(momentum).add_((1.0 - momentum) * source.detach())
        losses.append(loss.item())
        sync()
        if step >= workload["warmup"]:
            times.append((time.perf_counter() - start) * 1e3)

    mib = 2**20
    allocated = torch.cuda.max_memory_allocated(device) / mib if cuda else None
    reserved = torch.cuda.max_memory_reserved(device) / mib if cuda else None
    report = {
        "torch": torch.__version__,
        "attention": args.attention,
        "device": str(device),
        "precision": "bf16" if cuda else "fp32",
        "threads": torch.get_num_threads(),
        "params": params,
        "batch": workload["batch"],
        "steps": len(times),
        "step_ms_mean": statistics.fmean(times),
        "step_ms_median": statistics.median(times),
        "step_ms_min": min(times),
        "step_ms_max": max(times),
        "step_times_ms": times,
        "images_per_s": workload["batch"] * len(times) / (sum(times) / 1e3),
        "peak_memory_allocated_mib": allocated,
        "peak_memory_reserved_mib": reserved,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key + ':':27} {value}")


if __name__ == "__main__":
    main()
