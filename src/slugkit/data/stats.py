"""What a reader saw: :class:`ReadStats`, filled by the shard and folder readers, and its plain-words diagnosis.

The diagnosis is what an error says when a set yields nothing (or nothing that matches): which file is not a tar,
which holds no members, how many members were seen with which extensions, how many samples merged under one key —
so that the message names the real cause instead of suggesting a spelling problem.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LINKS_HINT = ("a tar stores a link, not the file it points to; create it with `tar -h` (symbolic links) or "
              "`tar --hard-dereference` (hard links)")
CAPTION_EXTS = ("txt",)
_MAX_EXTS = 20  # distinct extensions remembered (dotted base names make every extension distinct)


@dataclass
class ReadStats:
    """Counts of one read (one or several shards or folders), filled in place by the readers.

    ``samples`` usable pairs; ``skipped_*`` pairs dropped (``no_caption``: image without a ``.txt``; ``no_image``:
    no ``jpg/jpeg/png/webp`` member; ``bad_image``: undecodable or unconvertible; ``bad_caption``: caption bytes
    not UTF-8; ``duplicate_key``: a later copy of a key already read in the same shard or folder, or a shard
    listed twice; ``duplicate_pair``: a pair whose image bytes and caption equal those of a pair read earlier in the
    same read, under another key or in another file — a copied shard or folder); ``truncated_shards`` (cut or
    corrupt after the start), ``not_tar_shards`` (not a tar at all),
    ``empty_shards`` (no file members); ``members`` file members seen, ``extensions`` their extensions (the part
    after the first dot of the file name, at most 20 distinct), ``dotted_members`` members whose base name holds
    further dots before an image/caption extension, ``merged_keys`` keys holding several images or captions."""

    samples: int = 0
    skipped_no_caption: int = 0
    skipped_no_image: int = 0
    skipped_bad_image: int = 0
    skipped_bad_caption: int = 0
    skipped_duplicate_key: int = 0
    skipped_duplicate_pair: int = 0
    skipped_broken_link: int = 0  # a captioned folder's image or caption that is a link to nothing
    truncated_shards: list[str] = field(default_factory=list)
    not_tar_shards: list[str] = field(default_factory=list)
    empty_shards: list[str] = field(default_factory=list)
    members: int = 0
    extensions: Counter = field(default_factory=Counter)
    dotted_members: int = 0
    merged_keys: int = 0
    link_members: int = 0  # symbolic or hard links in a tar: no image or caption bytes, skipped
    split_keys: int = 0  # of skipped_duplicate_key: a later run bringing members the first lacked (members apart)
    examples: dict[str, str] = field(default_factory=dict)  # problem -> first example, for the diagnosis
    manifest: list[dict] = field(default_factory=list)  # filled by callers that record what they used

    def as_dict(self) -> dict:
        """JSON-ready counts (``run.json`` → ``read_stats``); every ``skipped_*`` value is an int."""
        return {
            "samples": self.samples,
            "skipped_no_caption": self.skipped_no_caption,
            "skipped_no_image": self.skipped_no_image,
            "skipped_bad_image": self.skipped_bad_image,
            "skipped_bad_caption": self.skipped_bad_caption,
            "skipped_duplicate_key": self.skipped_duplicate_key,
            "skipped_duplicate_pair": self.skipped_duplicate_pair,
            "skipped_broken_link": self.skipped_broken_link,
            "truncated_shards": list(self.truncated_shards),
            "not_tar_shards": list(self.not_tar_shards),
            "empty_shards": list(self.empty_shards),
            "members": self.members,
            "extensions": dict(self.extensions),
            "merged_keys": self.merged_keys,
            "split_keys": self.split_keys,
            "link_members": self.link_members,
        }

    def to_json(self) -> dict:
        """Everything :meth:`from_json` needs to rebuild these counts (a resumed pass keeps what it read before)."""
        return {**self.as_dict(), "dotted_members": self.dotted_members, "examples": dict(self.examples)}

    @classmethod
    def from_json(cls, d: dict) -> "ReadStats":
        """The counts :meth:`to_json` wrote (or the sum of several: :meth:`absorb`)."""
        out = cls()
        out.absorb(d)
        return out

    def absorb(self, d: dict) -> None:
        """Add the counts of another read (``to_json``'s dict): another rank's, or an earlier run's before a resume."""
        for k, v in d.items():
            if k == "examples":
                for problem, example in v.items():
                    self.note(problem, example)
            elif k == "extensions":
                self.extensions.update(v)
            elif isinstance(v, list):
                getattr(self, k).extend(x for x in v if x not in getattr(self, k))
            elif hasattr(self, k):
                setattr(self, k, getattr(self, k) + int(v))

    def note(self, problem: str, example: str) -> None:
        """Remember the first example of ``problem`` (a short text naming the file/member) for :meth:`diagnosis`."""
        self.examples.setdefault(problem, example)

    def add_member(self, ext: str) -> None:
        """Count one file member with extension ``ext`` (``""`` for none)."""
        self.members += 1
        if ext in self.extensions or len(self.extensions) < _MAX_EXTS:
            self.extensions[ext] += 1
        else:
            self.extensions["(other)"] += 1

    def problems(self) -> list[str]:
        """One plain-words line per kind of problem met (empty when everything read was usable)."""
        out = []
        for path in self.not_tar_shards:
            out.append(f"{path} is not a tar shard ({self.examples.get('not_tar:' + path, 'unknown content')})")
        for path in self.empty_shards:
            out.append(f"{path} holds no file members ({self.examples.get('empty:' + path, 'an empty tar')})")
        for path in self.truncated_shards:
            out.append(f"{path} is truncated or corrupt ({self.examples.get('truncated:' + path, 'cut short')}); "
                       "the samples before the damage, if any, were read")
        if self.dotted_members:
            out.append(f"{self.dotted_members} member name(s) hold dots inside the base name (e.g. "
                       f"{self.examples.get('dotted', '?')}); a key ends at the first dot of the file name "
                       "(webdataset), so those members do not pair up as <key>.jpg + <key>.txt"
                       + (f" and {self.merged_keys} key(s) merged several samples into one" if self.merged_keys
                          else "") + "; rename them without dots before the extension (e.g. img_v2_00000.jpg)")
        elif self.merged_keys:
            out.append(f"{self.merged_keys} key(s) merged several images or captions into one sample (e.g. "
                       f"{self.examples.get('merged', '?')})")
        if self.skipped_no_caption:
            other = sorted(e for e in self.extensions if e and e not in IMAGE_EXTS + CAPTION_EXTS
                           and e != "(other)" and "." not in e)
            out.append(f"{self.skipped_no_caption} image(s) have no caption <key>.txt (e.g. "
                       f"{self.examples.get('no_caption', '?')})"
                       + (f"; captions must be .txt, other extensions found: {', '.join(other)}" if other else ""))
        if self.skipped_no_image:
            out.append(f"{self.skipped_no_image} sample(s) have no image ({'/'.join(IMAGE_EXTS)}; e.g. "
                       f"{self.examples.get('no_image', '?')})")
        for attr, what in (("skipped_bad_image", "image(s) could not be decoded or converted to 8-bit RGB"),
                           ("skipped_bad_caption", "caption(s) are not UTF-8 or are blank"),
                           ("skipped_duplicate_key", "later copies of a key already read were skipped"),
                           ("skipped_duplicate_pair", "pair(s) byte-identical (image and caption) to a pair read "
                                                      "earlier were skipped, so that no pair counts twice; a shard or "
                                                      "folder copied under another name?"),
                           ("skipped_broken_link", "pair(s) skipped: the image or caption is a link to nothing")):
            n = getattr(self, attr)
            if n:
                out.append(f"{n} {what} (e.g. {self.examples.get(attr, '?')})")
        if self.link_members and not self.empty_shards:  # a tar of links alone is an empty shard, said above
            out.append(f"{self.link_members} tar member(s) are links, skipped (e.g. "
                       f"{self.examples.get('link_members', '?')}): {LINKS_HINT}")
        for said in ("across_ranks", "folder_again", "tars_in_folder"):  # gradpass; captioned folders
            if said in self.examples:
                out.append(self.examples[said])
        if self.split_keys:  # "later copies" hid that the image and the caption of a pair were apart (ninth trial)
            out.append(f"{self.split_keys} of those were the other half of a pair whose members are not next to each "
                       f"other in the tar (e.g. {self.examples.get('split_keys', '?')}); a webdataset shard keeps each "
                       "sample's files together: rebuild it sorted (tar --sort=name -cf SHARD.tar -C DIR .)")
        return out

    def diagnosis(self) -> str:
        """What was read, in words: members seen and their extensions, usable pairs, then :meth:`problems`."""
        exts = ", ".join(f"{e or '(none)'} ×{n}" for e, n in self.extensions.most_common(8))
        more = len(self.extensions) - 8
        head = (f"{self.members} member(s) seen" + (f" (extensions: {exts}{f' and {more} more' if more > 0 else ''})"
                                                      if self.members else "")
                + f", {self.samples} usable image–caption pair(s)")
        return "; ".join([head, *self.problems()])
