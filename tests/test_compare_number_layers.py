"""compare_number_layers (Figure 5 bottom) on small synthetic data, end to end."""
import json

import compare_number_layers as layers
from neural_network import num_params


class Outcome:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_script(module, *args, capsys):
    """Run module.main in-process (faster than a subprocess) like the command line: exit status and output."""
    from common import run_main

    capsys.readouterr()
    try:
        code = run_main(module.main, ["--synthetic", *args])
    except SystemExit as exit_:  # argparse rejections
        code = exit_.code
    out = capsys.readouterr()
    return Outcome(code, out.out, out.err)



def test_layers_quick_end_to_end_and_reproducible(tmp_path, capsys):
    results = []
    for i in range(2):
        d = tmp_path / str(i)
        out = run_script(layers, "--quick", "--iters", "3", "--out-dir", str(d), capsys=capsys)
        assert out.returncode == 0, out.stderr
        results.append(json.loads((d / "results" / "compare_number_layers.json").read_text()))
    models = results[0]["models"]
    assert list(models) == ["784-10", "784-20-10", "784-20-20-10"]
    for name, m in models.items():
        assert m["steps"] == 3 and m["hand_tuned"]["best_lambda"] in m["hand_tuned"]["lambdas"]
        assert m["hand_tuned"]["best_valid"] == min(m["hand_tuned"]["valid"])
        for key in ("final_valid", "final_test", "best_valid"):
            assert m[key] == results[1]["models"][name][key]
    assert isinstance(results[0]["target"]["deeper_models_below_linear_valid"], bool)
    assert (tmp_path / "0" / "compare_number_layers.pdf").exists()


def test_layers_default_config_matches_paper_sizes():
    assert [num_params(s) for s in layers.Config().models] == [7850, 79510, 89610]
    assert layers.Config().n_train == layers.Config().n_valid == layers.Config().n_test == 10000
