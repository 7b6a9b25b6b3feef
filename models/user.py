"""A network of one's own, `--model module.path:function`, measured through a forward hook.

The module is imported from Python's path (put its folder on PYTHONPATH) and `function(num_classes=C,
in_channels=K, width=W)` must return an `nn.Module` whose last layer is an `nn.Linear`: the module's output
is that layer's output, the logits. Its penultimate features are that layer's input, read by a forward
hook on it, as Papyan, Han & Donoho's notebook reads them, so that everything the registry's networks do
works on it: train.py, validate_nc.py and every figure. The last layer is the last `nn.Linear` among the
network's modules, and each measurement checks that its output is the network's.

The network is held as `net` of a `HookedNetwork`, which gives it the registry's interface (`features`,
`fc`, `stage_features`, one stage: the penultimate layer); checkpoints hold its own state-dict keys
prefixed by "net.".
"""
import importlib
import inspect
import re

import torch
import torch.nn as nn

from errors import UserError

PATTERN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class HookedNetwork(nn.Module):
    """Any classifier whose last layer is `nn.Linear`, with the registry networks' interface."""

    stage_names = ("penultimate",)

    def __init__(self, net: nn.Module, classifier_name: str, spec: str):
        super().__init__()
        self.net = net
        self._classifier_name, self._spec = classifier_name, spec

    @property
    def fc(self) -> nn.Linear:
        """The last linear layer (a submodule of `net`, not registered twice)."""
        return self.net.get_submodule(self._classifier_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the last linear layer (B, D), from a forward pass of the whole network."""
        seen = {}
        handle = self.fc.register_forward_hook(lambda module, inputs, output: seen.update(h=inputs[0], z=output))
        try:
            output = self.net(x)
        finally:
            handle.remove()
        if "h" not in seen or not (output is seen["z"] or (isinstance(output, torch.Tensor)
                                                           and output.shape == seen["z"].shape
                                                           and torch.equal(output, seen["z"]))):
            raise UserError(f"the network of --model {self._spec} does not end with its last nn.Linear "
                            f"({self._classifier_name}): its output must be that layer's output, the logits")
        return seen["h"]

    def stage_features(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(self.stage_names[0], self.features(x))]

    def check_output(self, x: torch.Tensor) -> None:
        """Raise the UserError of `features` unless the network's output on `x` is its last nn.Linear's, in eval
        mode and without gradients: nothing of the network (its batch-norm statistics) changes."""
        training = self.training
        try:
            with torch.no_grad():
                self.eval().features(x)
        finally:
            self.train(training)


def build(spec: str, num_classes: int, in_channels: int, width: int) -> HookedNetwork:
    """The network `function(num_classes=..., in_channels=..., width=...)` of `spec` = "module.path:function"."""
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise  # the module was found; something it imports is missing: its own traceback says what
        raise UserError(f"--model {spec}: no module named {err.name} on Python's path; put the folder that "
                        f"holds it on PYTHONPATH (e.g. PYTHONPATH=. python train.py --model {spec} ...)") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--model {spec}: {module_name} has no function {function_name}")
    arguments = {"num_classes": num_classes, "in_channels": in_channels, "width": width}
    try:
        inspect.signature(function).bind(**arguments)
    except TypeError:
        raise UserError(f"--model {spec}: {function_name} must take num_classes=, in_channels= and width= (e.g. def "
                        f"{function_name}(num_classes, in_channels, width)) and return an nn.Module") from None
    except ValueError:
        pass  # no signature to read (some built-ins): the call says whether it fits
    net = function(**arguments)
    if not isinstance(net, nn.Module):
        raise UserError(f"--model {spec}: {function_name} returned a {type(net).__name__}, not an nn.Module")
    linear = [(name, module) for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise UserError(f"--model {spec}: the network has no nn.Linear; its last layer must be one")
    name, last = linear[-1]
    if last.out_features != num_classes:
        raise UserError(f"--model {spec}: its last nn.Linear ({name}) has {last.out_features} outputs, not one per "
                        f"class ({num_classes})")
    return HookedNetwork(net, name, spec)
