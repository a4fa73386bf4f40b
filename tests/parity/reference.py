"""Pure-PyTorch reference of the EC-IJEPA model, written from METHOD.md.

It mirrors the public I-JEPA module and parameter names (so the Rust
weights load with ``strict=True``) but is written independently of the Rust
code and computes things differently where it can: attention is an
explicit softmax, the conditioning tokens come from ``avg_pool2d`` over the
grid mask, and images with conditioning run one at a time, so no padding
or attention mask is involved.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6


def sincos_2d(dim, grid_h, grid_w):
    """[h*w, dim] float32 table: first half column index, second half row
    index, each half [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k/(dim/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")

    def half(pos):
        angles = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([half(cols), half(rows)], axis=1)
    return torch.from_numpy(table.astype(np.float32))


class PatchEmbed(nn.Module):
    def __init__(self, channels, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (hd ** -0.5)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def gather(x, idx):
    """x [B, N, C] at idx [B, K] -> [B, K, C]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def pooled_positions(table, positions, grid, kernel, stride):
    """Conditioning positions of one image: the 0/1 grid mask of
    `positions`, P averaged over each k x k window (stride s) weighted by
    the mask, windows without a position dropped; raster order. [K, D]."""
    d = table.size(1)
    mask = torch.zeros(grid * grid)
    mask[positions] = 1.0
    mask = mask.view(1, 1, grid, grid)
    grid_table = table.t().reshape(1, d, grid, grid)
    total = F.avg_pool2d(grid_table * mask, kernel, stride)  # [1, D, h', w']
    weight = F.avg_pool2d(mask, kernel, stride)  # [1, 1, h', w']
    keep = weight.flatten() > 0
    means = (total / weight.clamp_min(1e-12)).flatten(2)[0].t()  # [h'*w', D]
    return means[keep]


class Encoder(nn.Module):
    def __init__(self, cfg, learned_token):
        super().__init__()
        d, grid = cfg["embed_dim"], cfg["image_size"] // cfg["patch_size"]
        self.grid = grid
        self.patch_embed = PatchEmbed(cfg["in_channels"], d, cfg["patch_size"])
        table = sincos_2d(d, grid, grid).unsqueeze(0)
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        if learned_token:
            self.cond_token = nn.Parameter(torch.zeros(1, 1, d))
        else:
            self.cond_token = None
        self.blocks = nn.ModuleList(Block(d, cfg["num_heads"]) for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.last_sequence_lengths = []

    def cond_tokens(self, positions, kernel, stride):
        tokens = pooled_positions(self.pos_embed[0], positions, self.grid, kernel, stride)
        if self.cond_token is not None:
            tokens = tokens + self.cond_token[0]
        return tokens

    def run(self, x):
        self.last_sequence_lengths.append(x.size(1))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, images, keep=None, cond=None):
        """Plain I-JEPA when `cond` is None; otherwise `cond` is
        (per-image position lists, kernel, stride) and images run alone."""
        self.last_sequence_lengths = []
        x = self.patch_embed(images) + self.pos_embed
        if keep is not None:
            x = gather(x, keep)
        n = x.size(1)
        if cond is None:
            return self.norm(self.run(x))
        per_image, kernel, stride = cond
        outs = []
        for b, positions in enumerate(per_image):
            extra = self.cond_tokens(positions, kernel, stride).unsqueeze(0)
            seq = self.run(torch.cat([x[b : b + 1], extra], dim=1))
            outs.append(seq[:, :n])
        return self.norm(torch.cat(outs, dim=0))


class Predictor(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, p = cfg["embed_dim"], cfg["pred_dim"]
        grid = cfg["image_size"] // cfg["patch_size"]
        self.predictor_embed = nn.Linear(d, p)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, p))
        table = sincos_2d(p, grid, grid).unsqueeze(0)
        self.predictor_pos_embed = nn.Parameter(table, requires_grad=False)
        self.predictor_blocks = nn.ModuleList(
            Block(p, cfg["num_heads"]) for _ in range(cfg["pred_depth"])
        )
        self.predictor_norm = nn.LayerNorm(p, eps=LN_EPS)
        self.predictor_proj = nn.Linear(p, d)

    def forward(self, ctx, ctx_idx, target_idx):
        """ctx [B, Nc, D]; target_idx list of M [B, Nt] -> [M*B, Nt, D]."""
        b = ctx.size(0)
        pos = self.predictor_pos_embed.expand(b, -1, -1)
        x = self.predictor_embed(ctx) + gather(pos, ctx_idx)
        n_ctx = x.size(1)
        queries = torch.cat([gather(pos, idx) for idx in target_idx], dim=0)
        queries = queries + self.mask_token
        x = torch.cat([x.repeat(len(target_idx), 1, 1), queries], dim=1)
        for block in self.predictor_blocks:
            x = block(x)
        return self.predictor_proj(self.predictor_norm(x)[:, n_ctx:])


class EcIjepaReference(nn.Module):
    def __init__(self, cfg, case):
        super().__init__()
        learned = case["conditioning"] == "ec" and case["learned_token"]
        self.case = case
        self.encoder = Encoder(cfg, learned)
        self.predictor = Predictor(cfg)
        self.target_encoder = Encoder(cfg, learned)

    def load_rust_weights(self, tensors):
        for part in ("encoder", "predictor", "target_encoder"):
            prefix = part + "."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            getattr(self, part).load_state_dict(state, strict=True)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)

    def forward(self, images, ctx_idx, target_idx):
        """Returns (context out, target features, predictions, loss)."""
        ec = self.case["conditioning"] == "ec"
        kernel, stride = self.case["kernel"], self.case["stride"]
        batch = images.size(0)
        with torch.no_grad():
            cond = ([ctx_idx[b] for b in range(batch)], kernel, stride) if ec else None
            h = self.target_encoder(images, cond=cond)
            h = F.layer_norm(h, (h.size(-1),))
            targets = torch.cat([gather(h, idx) for idx in target_idx], dim=0)
        unions = [torch.unique(torch.cat([idx[b] for idx in target_idx])) for b in range(batch)]
        cond = (unions, kernel, stride) if ec else None
        z = self.encoder(images, keep=ctx_idx, cond=cond)
        pred = self.predictor(z, ctx_idx, target_idx)
        loss = F.smooth_l1_loss(pred, targets)
        return z, targets, pred, loss


def ema_expected(target, context, momentum):
    return target * momentum + (1.0 - momentum) * context

