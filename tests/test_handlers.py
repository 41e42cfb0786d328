"""Training handlers on bare ignite engines (no network): when validation runs."""

import pytest
from ignite.engine import Engine

from custom_components.training.handlers import FinalValidationHandler


class Validator:
    """Stands in for the evaluator (``ValidationHandler`` calls ``validator.run(trainer epoch)``)."""

    def __init__(self):
        self.epochs = []

    def run(self, global_epoch):
        self.epochs.append(global_epoch)


@pytest.mark.parametrize("max_epochs, interval, expected", [(7, 3, [3, 6, 7]), (6, 3, [3, 6]), (2, 5, [2]),
                                                            (4, 1, [1, 2, 3, 4])])
def test_validates_every_interval_and_after_the_last_epoch(max_epochs, interval, expected):
    validator = Validator()
    trainer = Engine(lambda engine, batch: None)
    handler = FinalValidationHandler(interval=interval, epoch_level=True)
    handler.validator = validator  # not an Evaluator, which __init__ / set_validator insist on
    handler.attach(trainer)
    trainer.run([0], max_epochs=max_epochs)
    assert validator.epochs == expected
