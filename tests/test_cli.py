"""The ``megatron-renio`` console script's dispatch: usage, help and unknown commands."""

from megatron_renio import cli


def test_without_a_command_the_usage_is_an_error_and_help_is_not(capsys):
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: megatron-renio <command> [flags]")
    for flag in ("-h", "--help"):
        assert cli.main([flag]) == 0
        captured = capsys.readouterr()
        assert captured.err == "" and all(f"  {name} " in captured.out for name in cli.COMMANDS)


def test_an_unknown_command_is_one_line_naming_the_commands(capsys):
    assert cli.main(["trian", "--lr", "1"]) == 2
    assert capsys.readouterr().err == f"error: unknown command 'trian'; commands: {', '.join(cli.COMMANDS)}\n"
