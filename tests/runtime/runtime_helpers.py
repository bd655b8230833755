"""Tiny synthetic molecules and a tiny model, so the runtime tests run in seconds on 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from se3t.runtime.build import ModelConfig, TargetInfo

TINY = ModelConfig(num_layers=1, num_degrees=2, num_channels=4, num_heads=2, channels_div=2, pooling="max")


@dataclass(frozen=True)
class SimpleBatch:
    """The subset of se3t_data.PaddedBatch the runtime uses: one dummy graph slot holds nothing here."""

    node_feats: torch.Tensor
    edge_feats: torch.Tensor
    edge_index: torch.Tensor
    pos: torch.Tensor
    graph_index: torch.Tensor
    num_graphs: int
    y: torch.Tensor
    graph_mask: torch.Tensor

    def to(self, device):
        return SimpleBatch(self.node_feats.to(device), self.edge_feats.to(device), self.edge_index.to(device),
                           self.pos.to(device), self.graph_index.to(device), self.num_graphs, self.y.to(device),
                           self.graph_mask.to(device))

    def model_inputs(self):
        return dict(node_feats={0: self.node_feats}, edge_index=self.edge_index, pos=self.pos,
                    edge_feats={0: self.edge_feats}, graph_index=self.graph_index, num_graphs=self.num_graphs)


class SyntheticMolecules(torch.utils.data.Dataset):
    """Random small molecules (3-6 atoms, or ``same_size`` atoms each; fully connected) with a smooth invariant
    target."""

    def __init__(self, n: int, seed: int = 0, nan_at: int | None = None, same_size: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            k = int(torch.randint(3, 7, (1,), generator=g))
            k = same_size or k
            pos = torch.randn(k, 3, generator=g) * 1.5
            z = torch.randint(0, 5, (k,), generator=g)
            src, dst = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
            keep = src != dst
            edge_index = torch.stack([src[keep], dst[keep]])
            bond = torch.randint(0, 4, (edge_index.shape[1],), generator=g)
            d = (pos[edge_index[1]] - pos[edge_index[0]]).norm(dim=-1)
            y = float((1.0 / (1.0 + d)).mean() + 0.1 * z.float().mean())
            if nan_at is not None and i == nan_at:
                y = float("nan")
            self.items.append((pos, z, edge_index, bond, y))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(samples) -> SimpleBatch:
    node, edge, eidx, pos, gidx, ys = [], [], [], [], [], []
    offset = 0
    for g, (p, z, ei, bond, y) in enumerate(samples):
        onehot = torch.nn.functional.one_hot(z, 5).float()
        node.append(torch.cat([onehot, (z.float() + 1)[:, None]], dim=1)[..., None])
        edge.append(torch.nn.functional.one_hot(bond, 4).float()[..., None])
        eidx.append(ei + offset)
        pos.append(p)
        gidx.append(torch.full((p.shape[0],), g))
        ys.append(y)
        offset += p.shape[0]
    # one extra (padding) graph slot with no nodes and a garbage target, as PaddedBatch has
    n = len(samples)
    return SimpleBatch(torch.cat(node), torch.cat(edge), torch.cat(eidx, 1), torch.cat(pos), torch.cat(gidx),
                       n + 1, torch.tensor(ys + [1e6], dtype=torch.float32),
                       torch.tensor([True] * n + [False]))


def target_of(ds) -> TargetInfo:
    ys = torch.tensor([it[4] for it in ds.items])
    ys = ys[torch.isfinite(ys)]
    return TargetInfo("synthetic", "eV", float(ys.mean()), float(ys.std()))
