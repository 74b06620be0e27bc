"""`siftc convert --kind wide` bad input through the CLI: a one-line error, exit code 2, nothing written."""
from click.testing import CliRunner

from siftc.cli import main

from conftest import spec_path


def test_cli_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", spec_path("examples/mlp.py:mlp"), "--kind", "wide",
                                       "--sparsity", "0.5", "--round-to", "-3", "-o", str(out)])
    assert result.exit_code == 2 and "round-to" in result.output and not out.exists()
    result = CliRunner().invoke(main, ["convert", spec_path("examples/mlp.py:mlp"), "--kind", "wide",
                                       "--sparsity", "0.99", "-o", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and not out.exists()
