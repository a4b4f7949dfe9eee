"""The reference-data folder comes from KVLAB_DATA_DIR first, so an installed kvlab finds its traces."""
from emulator import datasets, traces
from emulator.calibrate.fidelity import profiles_dir


def test_kvlab_data_dir_names_the_traces_and_profiles(tmp_path, monkeypatch):
    (tmp_path / "traces").mkdir()
    (tmp_path / "profiles" / "vidur").mkdir(parents=True)
    (tmp_path / "traces" / "mine.jsonl").write_text('{"timestamp": 0, "input_length": 1, "output_length": 1, '
                                                     '"hash_ids": [7]}\n')
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path))
    assert traces.shared_trace("mine.jsonl") == tmp_path / "traces" / "mine.jsonl"
    assert profiles_dir() == tmp_path / "profiles" / "vidur"


def test_a_missing_dataset_is_none_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path))
    assert traces.shared_trace() is None
    assert profiles_dir() is None
    assert profiles_dir("explicit/folder").as_posix() == "explicit/folder"


def test_without_the_variable_a_shared_data_folder_above_the_working_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data" / "traces").mkdir(parents=True)
    work = tmp_path / "repo" / "sub"
    work.mkdir(parents=True)
    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(work)
    assert datasets.data_dir() == tmp_path / "shared" / "data"
