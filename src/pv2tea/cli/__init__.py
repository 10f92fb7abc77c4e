"""The ``pv2tea`` command line.

Commands:

- ``train``, ``weak-label``, ``experiment`` (:mod:`.train`): train PV2TEA; train a text extractor and write its
  answers as weak labels; train every variant over seeds;
- ``evaluate``, ``report`` (:mod:`.evaluate`): score a model against gold, by source; figures and a page of a run;
- ``predict``, ``calibrate`` (:mod:`.predict`): extract values from a file of products; fit the model's share
  against a text extractor per attribute;
- ``serve`` (:mod:`.serve`): a model over HTTP;
- ``demo`` (:mod:`.demo`): the whole method on a synthetic catalog;
- ``data synth | validate | import implicitave | import fashion-product-images`` (:mod:`.data`);
- ``cache build | info`` (:mod:`.cache`): the frozen backbones' features on disk;
- ``bench implicitave | catalog | neighbors | train | extract | serve`` (:mod:`.bench`): accuracy and speed.

Each command is a typed function whose signature is its CLI; :mod:`.common` holds what they share. Expected failures
(bad data, bad config, missing files) print one clear message and exit with a non-zero code. Heavy libraries
(torch, transformers) are imported inside the commands, so ``pv2tea --help`` does not load them.
"""

from __future__ import annotations

import typer

from pv2tea.cli import bench, cache, data, demo, evaluate, predict, serve, train

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="PV2TEA: multimodal product attribute value extraction trained on weak text labels.",
)

# (name, function) of the top-level commands, in the order --help lists them; the groups follow
COMMANDS = (
    ("train", train.train),
    ("evaluate", evaluate.evaluate),
    ("predict", predict.predict),
    ("serve", serve.serve),
    ("demo", demo.demo),
    ("weak-label", train.weak_label_cmd),
    ("calibrate", predict.calibrate),
    ("experiment", train.experiment),
    ("report", evaluate.report),
)
GROUPS = (("data", data.app), ("cache", cache.app), ("bench", bench.app))

for _name, _command in COMMANDS:
    app.command(_name)(_command)
for _name, _group in GROUPS:
    app.add_typer(_group, name=_name)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process (for tests): returns the exit code instead of exiting."""
    try:
        code = app(args=argv, standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:  # click usage errors
        return int(exc.code or 0)
    except Exception as exc:  # click.ClickException (bad options)
        from click import ClickException

        if isinstance(exc, ClickException):
            exc.show()
            return exc.exit_code
        raise


__all__ = ["app", "main"]
