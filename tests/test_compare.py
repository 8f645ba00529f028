"""The eager comparison helper: a gradient on one side only is a failure, not a skipped parameter."""
import math

import torch

from seqweave.testing.compare import grad_errors


def _pair():
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    return model, reference


def test_equal_gradients_score_zero_and_a_difference_names_the_parameter():
    model, reference = _pair()
    model(torch.ones(1, 3)).sum().backward()
    reference(torch.ones(1, 3)).sum().backward()
    assert grad_errors(model, reference) == (0.0, "")
    model.bias.grad += 1
    worst, name = grad_errors(model, reference)
    assert worst > 0.5 and name == "bias"


def test_a_gradient_missing_on_one_side_is_an_infinite_error():
    model, reference = _pair()
    reference(torch.ones(1, 3)).sum().backward()
    worst, name = grad_errors(model, reference)
    assert math.isinf(worst) and name.startswith("weight")
