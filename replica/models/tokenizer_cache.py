"""The tokenizer transformers builds from a GGUF file, kept on disk after its first build.

Building it means reading the file's tokenizer arrays with gguf-py and converting them (11 s for
SmolLM2's 49k tokens on 2 cores, more for Llama 3's 128k), and a replica builds it twice: in
the server and in its engine core. The fast tokenizer it builds is saved with `save_pretrained`
and loaded back from those files on every later start (a fraction of a second).

The key is the file's content, not its path: a digest of its header and key/value fields (the
vocabulary, merges, special tokens and chat template, and the architecture and name, which pick
transformers' converter; `gguf_file.metadata_digest`, about 30 ms for SmolLM2, the weights never
read), with the versions of transformers and tokenizers. So copies of one file at other paths
(an Ollama blob, a test's copy) share an entry; another quantisation of the same model does not
(its general.file_type differs). A file changed in place gets a new one, whatever its
modification time says. A file whose fields cannot be read has no entry: it is built (and its
error reported) as before. Where the cache cannot be written (a read-only home in a container),
the tokenizer is built each time.

Location: $PAGEFLEET_CACHE_DIR, else $XDG_CACHE_HOME/pagefleet, else ~/.cache/pagefleet; the
tokenizers under tokenizers/<key>/.
"""
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

from replica.models.gguf_file import metadata_digest

log = logging.getLogger(__name__)

_MARKER = "tokenizer_config.json"      # an entry is renamed into place whole (see `save`)


def cache_root() -> Path:
    if os.environ.get("PAGEFLEET_CACHE_DIR"):
        return Path(os.environ["PAGEFLEET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pagefleet"


def entry_for(gguf_path: Path) -> Path:
    """The cache folder of this file's tokenizer (which may not exist yet). ValueError or
    OSError for a file whose fields cannot be read."""
    versions = [importlib.metadata.version(d) for d in ("transformers", "tokenizers")]
    key = "|".join(["gguf-fields", metadata_digest(gguf_path), *versions])
    return cache_root() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:32]


def load(gguf_path: Path):
    """The cached tokenizer of this file, or None (not cached yet, or unreadable)."""
    from transformers import AutoTokenizer

    try:
        entry = entry_for(gguf_path)
    except (OSError, ValueError):      # no key: the build reads the file and says what is wrong
        return None
    try:
        if not (entry / _MARKER).is_file():
            return None
        return AutoTokenizer.from_pretrained(str(entry))
    except Exception as err:  # a damaged entry is rebuilt, never fatal
        log.warning("the cached tokenizer of %s is unreadable (%s: %s); building it again",
                    gguf_path.name, type(err).__name__, err)
        return None


def save(gguf_path: Path, hf_tokenizer) -> None:
    """Saves into a temporary folder beside the entry, then renames it into place (over a
    damaged one): a reader sees a whole entry or none, and two replicas saving at once both
    succeed."""
    try:
        entry = entry_for(gguf_path)
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=entry.parent))
        try:
            hf_tokenizer.save_pretrained(str(staging))
            try:
                os.replace(staging, entry)
            except OSError:     # an entry is there: a damaged one that `load` refused, or a concurrent save's
                shutil.rmtree(entry, ignore_errors=True)
                try:
                    os.replace(staging, entry)
                except OSError:
                    if not (entry / _MARKER).is_file():
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except Exception as err:  # an unwritable cache costs only time
        log.info("tokenizer of %s not cached (%s); it is built at each start", gguf_path.name, err)
