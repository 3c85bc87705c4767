"""Reading a torch_dist checkpoint one region at a time, with no process group, no GPU and
no megatron-core model: what adadpo-export-hf (hf_export, lora_export) reads checkpoints with.

megatron-core's own loader wants whole tensors, and DCP's plain-tensor path cannot address a
region; a layer of a layer-stacked tensor ([layers, ...]) is such a region.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


class _RegionPlanner:
    """A torch.distributed.checkpoint load planner that reads one region of each tensor
    (a layer of a layer-stacked tensor) into a tensor of the region's shape: what
    megatron-core's loader refuses (it wants whole tensors) and DCP's plain-tensor path
    cannot address. Built on DCP's own planner helpers."""

    @staticmethod
    def make(regions):
        class Planner(DefaultLoadPlanner):
            def create_local_plan(self):
                items = []
                for fqn, (offsets, sizes) in regions.items():
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                 sizes=torch.Size(sizes))
                    items += create_read_items_for_chunk_list(
                        fqn, self.metadata.state_dict_metadata[fqn], [chunk])
                return LoadPlan(items)

            def lookup_tensor(self, index):
                return self.state_dict[index.fqn]

        return Planner()


def read_regions(checkpoint: Path, regions) -> Dict[str, torch.Tensor]:
    """{key: tensor of the region} for regions {key: (offsets, sizes, dtype)}."""
    state = {key: torch.empty(sizes, dtype=dtype) for key, (_, sizes, dtype) in regions.items()}
    planner = _RegionPlanner.make({k: (o, s) for k, (o, s, _) in regions.items()})
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(checkpoint)), planner=planner,
             no_dist=True)
    return state


def tensor_metadata(checkpoint: Path) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """{global name: (shape, dtype)} of the model tensors in a torch_dist checkpoint."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {key: (tuple(meta.size), meta.properties.dtype) for key, meta in metadata.items()
            if isinstance(meta, TensorStorageMetadata)
            and key.startswith(("embedding.", "decoder.", "output_layer."))}


def layer_regions(metadata, layer: int):
    """The regions of layer ``layer`` of every layer-stacked tensor in ``metadata``
    ({key: (shape, dtype)}), as read_regions takes them."""
    return {key: ((layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:], dtype)
            for key, (shape, dtype) in metadata.items()}


def layer_slices(checkpoint: Path, metadata, num_layers: int
                 ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(global name, full tensor) of every tensor, the layer-stacked ones (decoder.layers.*,
    [layers, ...]) one layer at a time, all of a layer's tensors in one read."""
    stacked = {k: v for k, v in metadata.items() if k.startswith("decoder.layers.")}
    for key, (shape, dtype) in sorted(metadata.items()):
        if key not in stacked:
            yield key, read_regions(checkpoint, {key: ((0,) * len(shape), shape, dtype)})[key]
    for layer in range(num_layers):
        for key, value in sorted(read_regions(checkpoint, layer_regions(stacked, layer)).items()):
            yield f"decoder.layers.{layer}.{key[len('decoder.layers.'):]}", value[0]
