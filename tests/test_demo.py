import pytest

from fedefm import demo


@pytest.mark.slow
def test_demo_pretrains_finetunes_both_inits_and_evaluates_on_test(tmp_path, monkeypatch):
    for name, value in dict(DEMO_IMAGES=24, DEMO_SIZE=64, DEMO_SHOTS=4, DEMO_EPOCHS=1, CORPUS_PER_CLASS=10,
                            CORPUS_SIZE=32, PRETRAIN_ROUNDS=2, POSITION_IMAGES=24, POSITION_SHOTS=2,
                            POSITION_EPOCHS=1).items():
        monkeypatch.setattr(demo, name, value)
    results = demo.run_demo(tmp_path, seed=0)
    assert set(results["segment"]) == set(results["classify"]) == {"scratch", "fedefm"}
    assert all(set(r["per_class"]) == {"catheter", "guidewire"} for r in results["segment"].values())
    assert all(r["classes"] == ["aortic_arch", "descending_aorta", "looped", "supra_aortic"]
               for r in results["classify"].values())
    assert (tmp_path / "pretrain_fedefm" / "global.safetensors").is_file()
    assert "loaded" in (tmp_path / "finetune_fedefm" / "log.txt").read_text()
    assert "loaded" in (tmp_path / "classify_fedefm" / "log.txt").read_text()
