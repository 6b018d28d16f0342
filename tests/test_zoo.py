"""The generated models tables and zoo manifest match timm's registry, and the manifest builder checks entries."""
import sys
from pathlib import Path

import pytest
import yaml

from timm_momentum.core.models import resnet_family, vit_family
from timm_momentum.tools.errors import ConversionError
from timm_momentum.tools.models import BEGIN, END, families_markdown, family_of, generated_files, readme_with_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'convert'))

from build_zoo import build_zoo, check_entry  # noqa: E402


@pytest.mark.parametrize('name', ['README.md', 'MODELS.md', 'convert/zoo.yaml'])
def test_the_generated_files_are_what_the_registry_generates(name):
    """If this fails, timm's registry or the generator changed: run `timm-momentum models --write`."""
    path = ROOT / name
    assert path.read_text() == generated_files(ROOT)[path], f'{name} is stale: run timm-momentum models --write'


def test_the_tables_name_every_architecture_and_tag():
    import timm

    models = (ROOT / 'MODELS.md').read_text()
    readme = (ROOT / 'README.md').read_text()
    table = readme[readme.index(BEGIN):readme.index(END)]
    sources = resnet_family.source_architectures() + vit_family.SOURCES
    for source in sources:
        assert f'`momentum_{source}`' in models and family_of(source) != 'other'
        assert f' {source},' in table or f' {source} |' in table
    entries = yaml.safe_load((ROOT / 'convert' / 'zoo.yaml').read_text())['models']
    tags = [t for s in sources for t in timm.list_pretrained(f'{s}.*')]
    assert sorted(e['source'] for e in entries) == sorted(f'timm/{t}' for t in tags) and len(tags) >= 450
    for entry in entries:
        check_entry(entry, 'zoo.yaml')


def test_a_readme_without_the_markers_is_refused():
    with pytest.raises(ValueError, match='no models table section'):
        readme_with_table('# a README\n')


@pytest.mark.parametrize('entry, message', [
    ({'source': 'timm/resnet50d.ra2_in1k'}, 'needs source and name'),
    ({'source': 'timm/vit_base_patch16_rpn_224.sw_in1k', 'name': 'x'}, "not a pretrained tag of timm's ResNet family"),
    ({'source': 'timm/vit_base_patch16_224.augreg_in21k', 'name': 'x'},
     'converts to momentum_vit_base_patch16_224.augreg_in21k, not x'),
    ({'source': 'timm/resnet50d.nope', 'name': 'momentum_resnet50d.nope'}, 'not a pretrained tag'),
    ({'source': 'timm/resnet50d.ra2_in1k', 'name': 'momentum_resnet50.ra2_in1k'},
     'converts to momentum_resnet50d.ra2_in1k, not momentum_resnet50.ra2_in1k'),
])
def test_a_bad_manifest_entry_is_refused_before_anything_converts(tmp_path, entry, message):
    manifest = tmp_path / 'zoo.yaml'
    manifest.write_text(yaml.safe_dump({'models': [{'source': 'timm/resnet18.a1_in1k', 'name':
                                                    'momentum_resnet18.a1_in1k'}, entry]}))
    with pytest.raises(ConversionError, match=message):
        build_zoo(str(manifest), str(tmp_path / 'zoo'))
    assert not (tmp_path / 'zoo').exists()


def test_models_prints_the_table_and_write_leaves_a_current_checkout_unchanged(tmp_path, capsys):
    from timm_momentum_cli import main

    assert main(['models']) == 0
    printed = capsys.readouterr().out
    assert printed == families_markdown() + '\n' and printed.strip() in (ROOT / 'README.md').read_text()
    (tmp_path / 'convert').mkdir()
    (tmp_path / 'README.md').write_text(f'# x\n\n{BEGIN}\nold\n{END}\n\nafter\n')
    assert main(['models', '--write', '--repo', str(tmp_path)]) == 0
    written = (tmp_path / 'README.md').read_text()
    assert 'old' not in written and written.endswith(f'{END}\n\nafter\n') and '| ResNet-RS |' in written
    assert (tmp_path / 'MODELS.md').read_text() == (ROOT / 'MODELS.md').read_text()
    assert (tmp_path / 'convert' / 'zoo.yaml').read_text() == (ROOT / 'convert' / 'zoo.yaml').read_text()
    capsys.readouterr()
    assert main(['models', '--write', '--repo', str(tmp_path)]) == 0
    assert capsys.readouterr().out == ''  # nothing to rewrite
