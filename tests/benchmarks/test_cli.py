"""How a benchmark command ends: on SIGTERM and on a rank's own failure under torchrun, in one line."""


def test_a_rank_failure_and_sigterm_end_the_command_in_one_line(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption) unwinds like Ctrl-C: exit code 143 and one line on how to go on; the
    handler before is restored. A rank's own failure under torchrun: exit code 1, one line."""
    import argparse
    import os
    import signal
    import time

    from benchmarks import cli

    args = argparse.Namespace(plugin=[], results_folder=tmp_path, continue_with="the command")

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert cli.run_main(terminated, args) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert capsys.readouterr().err == (f"terminated; finished runs and the last checkpoint are kept in {tmp_path}: "
                                       "the command continues\n")

    def failed():
        raise cli.RankFailure("[mtsl seed 0] failed on rank 1: out of memory")

    assert cli.run_main(failed, args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [mtsl seed 0] failed on rank 1: out of memory; finished runs") and \
        len(err.splitlines()) == 1
