from click.testing import CliRunner

from copytune.cli import main


def test_info_lists_every_strategy_with_its_availability():
    result = CliRunner().invoke(main, ["info", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "device   cpu (CPU)" in result.output
    for name in ("torch_per_copy", "torch_foreach", "triton_unified", "triton_persistent"):
        assert f"  {name}" in result.output
    assert "torch_per_copy     available" in result.output


def test_info_bad_device_is_one_line_error():
    result = CliRunner().invoke(main, ["info", "--device", "nonsense"])
    assert result.exit_code == 1
    assert result.output.startswith("Error:") and "Traceback" not in result.output
