"""The SE(3)-Transformer: attention blocks, a final convolution, optional pooling and an MLP head."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ._validate import check_edge_index, check_features, check_graph_index, check_input_dtypes, check_pos
from .basis import Basis, get_basis, safe_norm
from .fiber import Features, Fiber
from .graph import DestinationBlock, destination_blocks
from .nn.attention import AttentionBlockSE3
from .nn.conv import RADIAL_SHARING, ConvSE3, FuseLevel
from .nn.norm import NormSE3
from .nn.pooling import GraphPooling
from .nn.radial import RadialMLP

__all__ = ["SE3Transformer", "SE3TransformerPooled"]

FiberLike = Union[Fiber, Mapping[int, int]]

#: ``low_memory`` splits a layer into blocks of at least this many edges: every layer call has costs that do not
#: shrink with its edges (measured, QM9 model on 2 CPU cores, same process: at 100 molecules, ~3,700 edges, one
#: block takes 1.33x the step time without checkpoints and three blocks 1.73x; at 400 molecules three blocks of
#: ~4,950 edges take 1.42x).
LOW_MEMORY_MIN_BLOCK_EDGES = 4096


def _fiber(f: Optional[FiberLike]) -> Fiber:
    return f if isinstance(f, Fiber) else Fiber(f or {})


class SE3Transformer(nn.Module):
    """``num_layers`` x (AttentionBlockSE3 [+ NormSE3]) then a ConvSE3 with self-interaction to ``fiber_out``.

    Constructor arguments follow NVIDIA's reference implementation. se3t additions:

    * ``fuse_level``: the most fusion any conv may use (execution only; outputs do not change).
    * ``radial``: radial parametrization of every conv (``"conv"``, ``"output_degree"``, ``"input_degree"``,
      ``"pair"``), or a sequence with one entry per conv (``num_layers + 1``).
    * ``low_memory``: keep only each layer's input features for backward and recompute the layer there
      (non-reentrant checkpointing), one block of destination nodes with their incoming edges at a time
      (at most ``low_memory_blocks`` blocks of about equal edge counts and at least
      :data:`LOW_MEMORY_MIN_BLOCK_EDGES` edges each, :func:`se3t.graph.destination_blocks`): the activation
      memory of a fraction of one layer instead of all layers', ~1/3 more compute. Each block is one more call of
      every layer (measured same-process at 400 QM9 molecules on 2 CPU cores: step time 1.25x without
      checkpointing for one block, 1.31x two, 1.42x three, 1.58x four (before the kernel's minimum unit size,
      ``se3t.nn.fused.MIN_UNIT_GROUPS``); live tensors 752 MiB without,
      215 / 185 / 173 MiB with one / two / four blocks): the default is 3.
    * ``low_memory_segment``: with ``low_memory``, the layers are recomputed in segments of this many: only the
      input of a segment's first layer is kept through the step, and when backward reaches a segment its other
      layers' inputs are recomputed once (a forward without stored activations of all but its last layer) and
      kept until their layer's own recompute. With ``S`` segments of ``k`` layers at most ``S - 1 + k`` layer
      inputs are alive at once instead of one per layer. Measured (paper model, batch 100, 2-core Zen 4, one
      process): 2 keeps 3 of the 7 attention blocks' inputs at the peak (live tensors with the optimizer in
      backward 58.3 -> 47.7 MiB; 3 the same) for 6-9 % more step time; 1 keeps every layer's input (no extra
      forward).
    * ``reference_parity``: reproduce the reference where se3t chooses differently (see README,
      "Reference parity"): the final conv's self-interaction is then added on every edge before the sum.

    Forward shapes: ``node_feats[d]: [N, C, 2d+1]``, ``edge_index: [2, E]`` (src, dst; messages flow
    src -> dst), ``pos: [N, 3]``, ``edge_feats[d]: [E, C, 2d+1]``, ``graph_index: [N]``. Returns the output
    feature dict, or ``[N, C, 2d+1]`` of ``return_type``, or ``[num_graphs, C(, 2d+1)]`` with ``pooling``.
    """

    def __init__(self, num_layers: int, fiber_in: FiberLike, fiber_hidden: FiberLike, fiber_out: FiberLike,
                 num_heads: int, channels_div: int, fiber_edge: FiberLike = Fiber({}),
                 return_type: Optional[int] = None, pooling: Optional[str] = None, norm: bool = True,
                 use_layer_norm: bool = True, low_memory: bool = False,
                 fuse_level: Union[FuseLevel, str, int] = FuseLevel.EDGE_FRAME,
                 radial: Union[str, Sequence[str]] = "conv", reference_parity: bool = False,
                 low_memory_blocks: int = 3, low_memory_segment: int = 2):
        super().__init__()
        fiber_in, fiber_hidden, fiber_out, fiber_edge = map(_fiber, (fiber_in, fiber_hidden, fiber_out, fiber_edge))
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        radials = [radial] * (num_layers + 1) if isinstance(radial, str) else list(radial)
        if len(radials) != num_layers + 1 or any(r not in RADIAL_SHARING for r in radials):
            raise ValueError(f"radial must be one of {RADIAL_SHARING} or a list of {num_layers + 1} of them, "
                             f"got {radial!r}")
        if not isinstance(low_memory_blocks, int) or low_memory_blocks < 1:
            raise ValueError(f"low_memory_blocks must be a positive int, got {low_memory_blocks!r}")
        if not isinstance(low_memory_segment, int) or low_memory_segment < 1:
            raise ValueError(f"low_memory_segment must be a positive int, got {low_memory_segment!r}")
        if pooling is not None and return_type is None:
            raise ValueError("return_type must be given when pooling")
        if return_type is not None and return_type not in fiber_out:
            raise ValueError(f"return_type={return_type} is not a degree of fiber_out {fiber_out}")
        self.fiber_in, self.fiber_hidden, self.fiber_out, self.fiber_edge = fiber_in, fiber_hidden, fiber_out, fiber_edge
        self.num_layers, self.return_type, self.pooling = num_layers, return_type, pooling
        self.fuse_level = FuseLevel.coerce(fuse_level)
        self.low_memory, self.low_memory_blocks, self.reference_parity = low_memory, low_memory_blocks, reference_parity
        self.low_memory_segment = low_memory_segment
        self.max_degree = max(fiber_in.max_degree, fiber_hidden.max_degree, fiber_out.max_degree)

        modules = []
        fin = fiber_in
        for i in range(num_layers):
            # low_memory: the model checkpoints whole layers (below), so the layers themselves do not.
            modules.append(AttentionBlockSE3(fin, fiber_hidden, fiber_edge, num_heads, channels_div, use_layer_norm,
                                             self.fuse_level, False, radials[i]))
            if norm:
                modules.append(NormSE3(fiber_hidden))
            fin = fiber_hidden
        modules.append(ConvSE3(fin, fiber_out, fiber_edge, pool=True, use_layer_norm=use_layer_norm,
                               self_interaction=True, fuse_level=self.fuse_level, low_memory=False,
                               radial=radials[-1], reference_parity=reference_parity))
        # Same interleaving and name as the reference so checkpoints map one to one.
        self.graph_modules = nn.ModuleList(modules)
        if low_memory:  # the fused kernels too: one block's weights at a time; the radial MLPs keep their input only
            for m in self.graph_modules.modules():
                if isinstance(m, ConvSE3):
                    m.blockwise_kernel = True
                elif isinstance(m, RadialMLP):
                    m.recompute_hidden = True
        self.pooling_module = GraphPooling(pooling, return_type) if pooling is not None else None

    def _run_modules(self, start: int, stop: int, feats: Features, edge_feats: Features, radial_in: Tensor,
                     edge_index: Tensor, basis: Basis) -> Features:
        """``graph_modules[start:stop]`` in order on ``feats``."""
        for module in self.graph_modules[start:stop]:
            if isinstance(module, NormSE3):
                feats = module(feats)
            else:
                feats = module(feats, edge_feats, radial_in, edge_index, basis)
        return feats

    def _run_layer_block(self, start: int, stop: int, feats: Features, edge_feats: Features, radial_in: Tensor,
                         edge_index: Tensor, basis: Basis, block: DestinationBlock) -> Features:
        """One layer (``graph_modules[start]`` and the norms after it) at the nodes of ``block`` only: their rows
        ``[block.stop - block.start, C, 2d+1]`` of the layer's output. Every per-edge input is selected here, so
        that a checkpoint of this function keeps nothing per edge."""
        edges = block.edges
        rows = {d: t[block.start:block.stop] for d, t in feats.items()}
        src, dst = edge_index.index_select(1, edges).unbind(0)
        sub_index = torch.stack([src, dst - block.start])
        sub_edge_feats = {d: t.index_select(0, edges) for d, t in edge_feats.items()}
        out = self.graph_modules[start](feats, sub_edge_feats, radial_in.index_select(0, edges), sub_index,
                                        basis.select(edges), dst_feats=rows)
        for module in self.graph_modules[start + 1:stop]:
            out = module(out)
        return out

    # The checkpointed functions below take the node features as tensor arguments (their degrees apart), not as a
    # dict: a checkpoint holds non-tensor arguments, a dict's tensors included, by reference, where an enclosing
    # checkpoint (a segment's) cannot drop them.
    def _run_layer(self, start: int, stop: int, block: Optional[DestinationBlock], edge_feats: Features,
                   radial_in: Tensor, edge_index: Tensor, basis: Basis, degrees: Sequence[int],
                   *feats: Tensor) -> Features:
        """One layer on the whole graph (``block=None``) or on one block of destination nodes."""
        feats = dict(zip(degrees, feats))
        if block is None:
            return self._run_modules(start, stop, feats, edge_feats, radial_in, edge_index, basis)
        return self._run_layer_block(start, stop, feats, edge_feats, radial_in, edge_index, basis, block)

    def _run_segment(self, layers: Sequence[Tuple[int, int]], blocks: Sequence[DestinationBlock],
                     edge_feats: Features, radial_in: Tensor, edge_index: Tensor, basis: Basis,
                     degrees: Sequence[int], *feats: Tensor) -> Features:
        """``layers`` (``(start, stop)`` in ``graph_modules``) in order, each under its own checkpoint, per block
        of destination nodes when there are several."""
        out = dict(zip(degrees, feats))
        for start, stop in layers:
            if len(blocks) <= 1:  # the whole graph is one block: no selection of edges
                out = checkpoint(self._run_layer, start, stop, None, edge_feats, radial_in, edge_index, basis,
                                 tuple(out), *out.values(), use_reentrant=False)
                continue
            parts = [checkpoint(self._run_layer, start, stop, block, edge_feats, radial_in, edge_index, basis,
                                tuple(out), *out.values(), use_reentrant=False) for block in blocks]
            out = {d: torch.cat([p[d] for p in parts]) for d in parts[0]}
        return out

    def _run_low_memory(self, feats: Features, edge_feats: Features, radial_in: Tensor, edge_index: Tensor,
                        basis: Basis) -> Features:
        """The layers under checkpoints, in segments of ``low_memory_segment`` layers, each layer in blocks of
        destination nodes (see ``low_memory``)."""
        if self.fuse_level == FuseLevel.EDGE_FRAME and basis.harmonics is not None:
            # made once here, outside the checkpoints (with their gradients when forces are asked), then selected
            # per block: not remade per block and in each recompute
            basis.edge_frames()
        num_nodes = next(iter(feats.values())).shape[0]
        num_blocks = max(1, min(self.low_memory_blocks, edge_index.shape[1] // LOW_MEMORY_MIN_BLOCK_EDGES))
        blocks = destination_blocks(edge_index, num_nodes, num_blocks) if num_blocks > 1 else []
        # A layer is a graph module with the norms after it (their inputs would be one more stored copy).
        starts = [i for i, m in enumerate(self.graph_modules) if not isinstance(m, NormSE3)]
        layers = list(zip(starts, starts[1:] + [len(self.graph_modules)]))
        last = None
        if len(blocks) <= 1:
            # The last layer's backward runs first: a checkpoint would recompute its activations right away,
            # while every stored input is alive as now, so keeping them costs no more peak memory.
            last, layers = layers[-1], layers[:-1]
        k = self.low_memory_segment
        for segment in (layers[i:i + k] for i in range(0, len(layers), k)):
            args = (segment, blocks, edge_feats, radial_in, edge_index, basis, tuple(feats), *feats.values())
            # One layer needs no segment checkpoint around its own. A segment's recompute stops as soon as its
            # last layer's input exists (torch's early stop): the last layer runs only in its own recompute.
            feats = (self._run_segment(*args) if len(segment) == 1 else
                     checkpoint(self._run_segment, *args, use_reentrant=False, early_stop=True))
        if last is not None:
            feats = self._run_modules(*last, feats, edge_feats, radial_in, edge_index, basis)
        return feats

    def set_fuse_level(self, level: Union[FuseLevel, str, int]) -> None:
        """Change the execution fusion level of every conv (parameters are unaffected)."""
        self.fuse_level = FuseLevel.coerce(level)
        for m in self.modules():
            if isinstance(m, ConvSE3):
                m.fuse_level = self.fuse_level

    def compute_basis(self, edge_index: Tensor, pos: Tensor) -> Basis:
        """The kernel bases for ``rel_pos = pos[dst] - pos[src]`` (precompute and pass as ``basis=``)."""
        return get_basis(pos[edge_index[1]] - pos[edge_index[0]], self.max_degree)

    def forward(self, node_feats: Features, edge_index: Tensor, pos: Tensor, edge_feats: Optional[Features] = None,
                basis: Optional[Union[Basis, Mapping]] = None, graph_index: Optional[Tensor] = None,
                num_graphs: Optional[int] = None):
        check_pos(pos)
        N = pos.shape[0]
        check_features(node_feats, self.fiber_in, N, "node_feats", "one per point of pos")
        check_edge_index(edge_index, N)
        E = edge_index.shape[1]
        edge_feats = dict(edge_feats) if edge_feats else {}
        check_features(edge_feats, self.fiber_edge, E, "edge_feats", "one per edge of edge_index")
        param = next(self.parameters(), None)
        if param is not None:
            check_input_dtypes(param.dtype, {"pos": pos, **{f"node_feats[{d}]": t for d, t in node_feats.items()},
                                             **{f"edge_feats[{d}]": t for d, t in edge_feats.items()}})
        if self.pooling is not None:
            if graph_index is None:
                raise ValueError("graph_index is required when the model pools per graph")
            num_graphs = check_graph_index(graph_index, N, num_graphs)

        src, dst = edge_index[0], edge_index[1]
        rel_pos = pos.index_select(0, dst) - pos.index_select(0, src)
        if basis is None:
            basis = get_basis(rel_pos, self.max_degree)
        else:
            basis = Basis.from_pairs(basis)
            if basis.max_degree < self.max_degree or basis.num_edges != E:
                raise ValueError(f"basis was built for {basis.num_edges} edges and max_degree={basis.max_degree}; "
                                 f"this input has {E} edges and the model needs max_degree={self.max_degree}")
        dist, _ = safe_norm(rel_pos)
        scalars = [edge_feats[0].squeeze(-1)] if 0 in edge_feats else []
        radial_in = torch.cat(scalars + [dist.to(pos.dtype)], dim=-1)  # [E, C_e0 + 1]

        feats = {d: node_feats[d] for d in self.fiber_in.degrees}
        if self.low_memory and torch.is_grad_enabled():
            # Keep only each layer's input features; its activations are recomputed in backward.
            feats = self._run_low_memory(feats, edge_feats, radial_in, edge_index, basis)
        else:
            feats = self._run_modules(0, len(self.graph_modules), feats, edge_feats, radial_in, edge_index, basis)

        if self.pooling_module is not None:
            return self.pooling_module(feats, graph_index, num_graphs)
        if self.return_type is not None:
            return feats[self.return_type]
        return feats


class SE3TransformerPooled(nn.Module):
    """Graph-level regression (the QM9 model): SE3Transformer -> pooled degree-0 features -> MLP.

    Hidden fiber ``Fiber.create(num_degrees, num_channels)``; head ``Linear(C, C) -> ReLU -> Linear(C, output_dim)``
    with ``C = fiber_out.num_features``. Forward returns ``[num_graphs, output_dim]``.
    """

    def __init__(self, fiber_in: FiberLike, fiber_out: FiberLike, fiber_edge: FiberLike, num_degrees: int,
                 num_channels: int, output_dim: int = 1, num_layers: int = 7, num_heads: int = 8,
                 channels_div: int = 2, pooling: str = "max", norm: bool = True, use_layer_norm: bool = True,
                 low_memory: bool = False, fuse_level: Union[FuseLevel, str, int] = FuseLevel.EDGE_FRAME,
                 radial: Union[str, Sequence[str]] = "conv", reference_parity: bool = False,
                 low_memory_blocks: int = 3, low_memory_segment: int = 2):
        super().__init__()
        fiber_out = _fiber(fiber_out)
        if fiber_out.degrees != (0,):
            raise ValueError(f"SE3TransformerPooled pools degree-0 features: fiber_out must be {{0: C}}, got {fiber_out}")
        self.transformer = SE3Transformer(num_layers, fiber_in, Fiber.create(num_degrees, num_channels), fiber_out,
                                          num_heads, channels_div, fiber_edge, return_type=0, pooling=pooling or "max",
                                          norm=norm, use_layer_norm=use_layer_norm, low_memory=low_memory,
                                          fuse_level=fuse_level, radial=radial, reference_parity=reference_parity,
                                          low_memory_blocks=low_memory_blocks,
                                          low_memory_segment=low_memory_segment)
        n = fiber_out.num_features
        self.mlp = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, output_dim))
        self.output_dim = output_dim

    def set_fuse_level(self, level: Union[FuseLevel, str, int]) -> None:
        self.transformer.set_fuse_level(level)

    def forward(self, node_feats: Features, edge_index: Tensor, pos: Tensor, edge_feats: Optional[Features] = None,
                basis=None, graph_index: Optional[Tensor] = None, num_graphs: Optional[int] = None) -> Tensor:
        pooled = self.transformer(node_feats, edge_index, pos, edge_feats, basis, graph_index, num_graphs)
        return self.mlp(pooled)
