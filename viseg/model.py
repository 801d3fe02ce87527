"""Build the network a plan describes (dynamic-network-architectures, nnU-Net's own network package)."""

from __future__ import annotations

from torch import nn

from viseg.networks import build_network, get_architecture
from viseg.plans import Plans


def build_model(plans: Plans, configuration: str, deep_supervision: bool = True) -> nn.Module:
    """The planned network with nnU-Net's He initialisation (negative slope 1e-2, matching LeakyReLU)."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    plan = plans.configuration(configuration)
    network = build_network(get_architecture(plan.network.architecture), plan.network.as_kwargs(),
                            plans.num_channels, plans.num_classes, deep_supervision=deep_supervision)
    network.apply(InitWeights_He(1e-2))
    return network
