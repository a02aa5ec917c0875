from lomt_kernels.build import main


def test_prebuild_command_builds_the_cpu_kernel(capsys):
    assert main([]) == 0
    assert "cpu: ready" in capsys.readouterr().out
