"""Build the network a plan describes (dynamic-network-architectures, nnU-Net's own network package)."""

from __future__ import annotations

from torch import nn

from viseg.planning.architectures import build_network, get_architecture
from viseg.planning.plans import Plans


def build_model(plans: Plans, configuration: str, deep_supervision: bool = True) -> nn.Module:
    """The planned network, initialised by its own `initialize` as nnU-Net's get_network_from_plans does.

    That is He initialisation (negative slope 1e-2, matching LeakyReLU) for every architecture, and for the
    residual encoder also zero weights in the last norm before each residual add, so every block starts as
    the identity; a generic He init alone would leave ResEnc's deep residual stacks unscaled at the start.
    """
    plan = plans.configuration(configuration)
    network = build_network(get_architecture(plan.network.architecture), plan.network.as_kwargs(),
                            plans.input_channels(configuration), plans.num_classes, deep_supervision=deep_supervision)
    network.apply(network.initialize)
    return network
