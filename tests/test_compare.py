"""compare.py's recipe screen: levers, their combinations, and the steps that match the default's CPU time."""
import pytest

import compare
from errors import UserError
from train import DEFAULTS


def test_levers_combine_left_to_right_and_unknown_ones_are_named():
    assert compare.lever("default") == {}
    assert compare.lever("uniform weighting + batch 128 + eps prediction") == {"weighting": "uniform",
                                                                                "batch_size": 128, "objective": "eps"}
    assert compare.lever("old default + batch 128 + lr 2e-3")["lr"] == 2e-3
    with pytest.raises(UserError, match="unknown lever 'batch 32'"):
        compare.lever("uniform weighting + batch 32")


def test_each_lever_gets_the_steps_that_take_the_defaults_cpu_time():
    speeds = {"default": 100.0, "batch 128": 110.0, "attention at 7 px": 80.0, "uniform weighting": 100.0}
    assert compare.lever_steps("default", 1000, speeds) == 1000
    assert compare.lever_steps("uniform weighting", 1000, speeds) == 1000
    batch = DEFAULTS["batch_size"]
    # Twice the batch: half the steps for the same images, at 110% of the images/s.
    assert compare.lever_steps("batch 128", 1000, speeds) == round(1000 * 1.1 * batch / 128)
    # A combination not measured as such: the product of its parts' relative speeds.
    assert compare.lever_steps("batch 128 + attention at 7 px", 1000, speeds) == round(1000 * 1.1 * 0.8 * batch / 128)
    assert compare.lever_steps("batch 128", 1000, None) == 1000  # no speeds: equal steps


def test_the_cost_of_a_step_depends_on_the_network_and_batch_only():
    assert compare.cost_key("uniform weighting") == compare.cost_key("default") == compare.cost_key("lr 2e-3")
    assert compare.cost_key("batch 128") != compare.cost_key("default")
    assert compare.cost_key("32 channels at 28 px") != compare.cost_key("default")
    assert compare.cost_key("attention at 7 px") != compare.cost_key("default")
