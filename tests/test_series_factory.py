import pydicom

from tests.series_factory import real_slices, write_ct_series


def test_generated_series_is_a_clean_uncompressed_stack(tmp_path):
    paths = write_ct_series(tmp_path, 45, rows=256, columns=300)
    assert len(paths) == 45
    datasets = [pydicom.dcmread(p) for p in paths]
    assert {ds.SeriesInstanceUID for ds in datasets} == {datasets[0].SeriesInstanceUID}
    assert len({ds.SOPInstanceUID for ds in datasets}) == 45
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert all(abs((b - a) - 2.0) < 1e-6 for a, b in zip(z, z[1:]))
    assert datasets[0].pixel_array.shape == (256, 300)
    assert datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    # slice 21 walks back onto the last real slice: the anatomy stays continuous
    real_last = real_slices()[-1][1]
    assert (datasets[20].pixel_array == real_last[:256, :300]).all()
