"""Flower's SecAgg+ arithmetic replayed in-process with Flower's own functions.

Each site does what ``secaggplus_mod`` does in its collect-masked-vectors stage (weight
ratio, ``quantize``, ``factor_combine``, a private mask and ECDH pairwise masks, mod
2^32); the server sums the masked vectors mod 2^32 as ``SecAggPlusWorkflow`` does,
removes the private masks through Shamir shares of their seeds, and applies its unmask
stage's ``factor_extract``, ``dequantize``, offset and ratio (flwr 1.41,
``secaggplus_workflow.py``). No site drops out, so no pairwise mask is rebuilt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)


@dataclass
class Federation:
    """Keys and mask seeds of ``n`` sites, as the setup and share-keys stages leave them."""

    n: int
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0
    private_keys: list[bytes] = field(default_factory=list)
    public_keys: list[bytes] = field(default_factory=list)
    seeds: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        for _ in range(self.n):
            sk, pk = generate_key_pairs()
            self.private_keys.append(private_key_to_bytes(sk))
            self.public_keys.append(public_key_to_bytes(pk))
            self.seeds.append(os.urandom(32))

    def masked_vector(self, site: int, vector: np.ndarray, num_examples: int) -> list[np.ndarray]:
        """What ``secaggplus_mod`` sends for ``vector`` (its fit result) and weight."""
        ratio = num_examples / self.max_weight
        q_ratio = round(ratio * self.quantization_range)
        dq_ratio = q_ratio / self.quantization_range
        params = parameters_multiply([vector], dq_ratio)
        quantized = quantize(params, self.clipping_range, self.quantization_range)
        quantized = factor_combine(q_ratio, quantized)
        dims = [a.shape for a in quantized]
        quantized = parameters_addition(
            quantized, pseudo_rand_gen(self.seeds[site], self.modulus_range, dims)
        )
        for other in range(self.n):
            if other == site:
                continue
            shared = generate_shared_key(
                bytes_to_private_key(self.private_keys[site]),
                bytes_to_public_key(self.public_keys[other]),
            )
            mask = pseudo_rand_gen(shared, self.modulus_range, dims)
            if site > other:
                quantized = parameters_addition(quantized, mask)
            else:
                quantized = parameters_subtraction(quantized, mask)
        return parameters_mod(quantized, self.modulus_range)

    def sum_masked(self, masked: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
        """The collect stage: masked vectors added, mod 2^32."""
        total = masked[0]
        for vec in masked[1:]:
            total = parameters_addition(total, vec)
        return parameters_mod(total, self.modulus_range)

    def unmask(self, total: list[np.ndarray]) -> np.ndarray:
        """The unmask stage: private masks removed (seeds rebuilt from a threshold of
        Shamir shares), then Flower's dequantization, offset and ratio."""
        threshold = self.n // 2 + 1
        for site in range(self.n):
            seed = combine_shares(create_shares(self.seeds[site], threshold, self.n)[:threshold])
            mask = pseudo_rand_gen(seed, self.modulus_range, get_parameters_shape(total))
            total = parameters_subtraction(total, mask)
        recon = parameters_mod(total, self.modulus_range)
        q_total_ratio, recon = factor_extract(recon)
        inv_dq_total_ratio = self.quantization_range / q_total_ratio
        aggregated = dequantize(recon, self.clipping_range, self.quantization_range)
        offset = -(self.n - 1) * self.clipping_range
        for vec in aggregated:
            vec += offset
            vec *= inv_dq_total_ratio
        return aggregated[0]

    def aggregate(self, vectors: Sequence[np.ndarray], num_examples: Sequence[int]) -> np.ndarray:
        """What the strategy receives for the sites' ``vectors`` and weights."""
        masked = [
            self.masked_vector(i, v, n)
            for i, (v, n) in enumerate(zip(vectors, num_examples, strict=True))
        ]
        return self.unmask(self.sum_masked(masked))
