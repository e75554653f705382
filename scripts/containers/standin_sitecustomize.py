# Mounted over the stand-in python base's /etc/python3.11/sitecustomize.py during image
# builds only (scripts/containers/build_images.sh, MESHLLM_BASES=local); never in an image.
# Debian's Python 3.11.2 predates PEP 706 (3.11.4): TarFile.extractall has no `filter`,
# which meshllm.native.build passes. The pinned public base (3.11.13) has it, so this only
# makes the stand-in as capable as the base it stands in for.
import tarfile

if not hasattr(tarfile, "data_filter"):
    _extractall = tarfile.TarFile.extractall

    def _extractall_with_filter(self, path=".", members=None, *, numeric_owner=False,
                                filter=None):
        return _extractall(self, path, members, numeric_owner=numeric_owner)

    tarfile.TarFile.extractall = _extractall_with_filter
