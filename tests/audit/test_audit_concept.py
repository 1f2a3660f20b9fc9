"""Which concept `slug audit` audits, and the advice when the one given is not the patch's."""

import pytest


def test_a_concept_the_patch_did_not_remove_gets_advice_that_fits_the_patch():
    """Trial 48: a several-concept patch advised "omit --concept", which it then refused; and no "did you mean"."""
    from slugkit.audit.run import audited_concept

    both = ["Jowen Gormere", "Serna Malton"]
    with pytest.raises(ValueError) as e:
        audited_concept("P", both, "Jowen Gormer")
    assert "did you mean 'Jowen Gormere'? name one the patch removed" in str(e.value) and "omit" not in str(e.value)
    with pytest.raises(ValueError, match="omit --concept, or name the one the patch removed"):
        audited_concept("P", "Jowen Gormere", "Hasa Malwick")
    with pytest.raises(ValueError, match="pass --concept NAME"):
        audited_concept("P", both, None)
    assert audited_concept("P", both, " serna malton ") == " serna malton "
