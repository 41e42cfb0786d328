"""custom_components.progress: shown only on a terminal and with progress=True; log lines go above the bar."""

import io
import logging

import pytest

from custom_components import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


LOGGER = "vesuvius.test_progress"


@pytest.fixture
def terminal(monkeypatch):
    """A terminal and a logger with its own console handler on it (level INFO, not propagating, as ignite's
    loggers are), restored after (pytest adds its capture handlers to it too). The test itself makes the
    terminal sys.stderr: pytest's capture sets sys.stderr again between setup and call."""
    term = Terminal()
    handler = logging.StreamHandler(term)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("LOG %(levelname)s %(message)s"))
    log = logging.getLogger(LOGGER)
    monkeypatch.setattr(log, "handlers", [handler])
    monkeypatch.setattr(log, "propagate", False)
    monkeypatch.setattr(log, "level", logging.DEBUG)
    yield term, handler


def test_bar_on_a_terminal_log_lines_through_tqdm_write(terminal, monkeypatch):
    term, handler = terminal
    monkeypatch.setattr("sys.stderr", term)
    log = logging.getLogger(LOGGER)
    with progress.progress_bar(2, "work", progress=True) as bar:
        assert not bar.disable
        assert handler not in log.handlers  # replaced by tqdm's handler while the bar is shown
        progress.advance(bar, "vol_a")
        log.info("half way")
        log.debug("not for the console")  # the console handler's level (INFO) still applies
        progress.advance(bar, "vol_b")
    assert handler in log.handlers  # restored
    text = term.getvalue()
    assert "LOG INFO half way\n" in text and "not for the console" not in text
    assert "work" in text and "2/2" in text and "vol_b" in text


def test_no_bar_without_a_terminal_or_with_progress_false(terminal, monkeypatch):
    term, handler = terminal
    monkeypatch.setattr("sys.stderr", term)
    with progress.progress_bar(1, "off", progress=False) as bar:
        assert bar.disable and handler in logging.getLogger(LOGGER).handlers  # no redirection
        progress.advance(bar, "x")
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    with progress.progress_bar(1, "pipe", progress=True) as bar:
        assert bar.disable
        progress.advance(bar, "x")
    assert term.getvalue() == ""
