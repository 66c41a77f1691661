"""Graph inputs, parameters fetched with get_attr, and the model output."""
from __future__ import annotations

from ..env import tensor_leaves
from ..facts import Effects, Link
from ..registry import ChannelRule, register


@register("placeholder")
class ModelInput(ChannelRule):
    """Model inputs carry no tracked channels: their interface never changes. A rule that
    reads one of their axes gets a fixed dim (the input's width is the user's contract)."""

    name = "input"

    def effects(self, node, env):
        return Effects()


@register("get_attr")
class Parameter(ChannelRule):
    """A parameter or buffer used directly in forward (cls token, layer scale, timm's BN
    weights): every axis longer than 1 is a potential channel dim, tied to the parameter
    itself so two uses of the same tensor stay coupled."""

    name = "parameter"

    def effects(self, node, env):
        shape = env.out_shape if env.out_facts.is_tensor else ()
        if node.target in env.mutated:  # state written in forward: neither sliced nor constant
            why = f"{node.target} is written in place during forward"
            return Effects(outputs=tuple(env.out((a,)) for a, n in enumerate(shape) if n > 1), fixed=tuple((env.out((a,)), why) for a, n in enumerate(shape) if n > 1))
        outs, links = [], []
        for axis, size in enumerate(shape):
            if size > 1:
                out = env.out((axis,))
                outs.append(out)
                links.append(Link(out, env.param_ref(node.target, axis)))
        return Effects(outputs=tuple(outs), links=tuple(links))

    def constants(self, node, env, known):
        if node.target in env.mutated:
            return {}
        value = env.param_value(node).detach().double()
        result = {}
        for axis, size in enumerate(value.shape):
            if size > 1:
                moved = value.movedim(axis, 0).reshape(size, -1)
                const = moved[:, 0].clone()
                const[(moved != moved[:, :1]).any(dim=1)] = float("nan")
                result[env.out((axis,))] = const.numpy()
        return result


@register("output")
class ModelOutput(ChannelRule):
    """Model outputs keep their full width: every channel that reaches one is needed."""

    name = "output"

    def effects(self, node, env):
        needs = []
        for arg in tensor_leaves((node.args, node.kwargs), elements=True):
            for ref in env.all_dims(arg):
                needs.append((ref, "model output"))
        return Effects(needs=tuple(needs))
