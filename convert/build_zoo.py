"""Convert every entry of a zoo manifest (convert/zoo.yaml) into one model folder each.

    python convert/build_zoo.py [--manifest convert/zoo.yaml] --out zoo/ [--force] [--push-org ORG]

Entries that fail (offline, bad checkpoint, ...) are reported with their error; the others are still
written. Exits non-zero if any entry failed.
"""
import argparse
import sys
from pathlib import Path

import yaml

from timm_momentum.tools.convert import convert
from timm_momentum.tools.errors import ConversionError


def check_entry(entry: dict, manifest: str) -> None:
    """ConversionError naming what is wrong with a manifest entry: keys, a source that is not a pretrained tag of
    timm's ResNet family or its Block-based ViTs (or a file or hf-hub: repo), or a name that is not that tag's
    momentum model."""
    import timm

    from timm_momentum.core.models import resnet_family, vit_family
    from timm_momentum.core.models.derive import momentum_name

    if not isinstance(entry, dict) or {'source', 'name'} - set(entry):
        raise ConversionError(f'{manifest}: entry {entry} needs source and name')
    source, name = str(entry['source']), str(entry['name'])
    tag = source[len('timm/'):] if source.startswith('timm/') else None
    if tag is None:
        return  # a file or an hf-hub: repo: the converter reads its architecture
    family = resnet_family.source_architectures() + vit_family.SOURCES
    if tag.split('.')[0] not in family or tag not in timm.list_pretrained(tag):
        raise ConversionError(f'{manifest}: {source} is not a pretrained tag of timm\'s ResNet family or its '
                              f'Block-based ViTs')
    if name != momentum_name(tag):
        raise ConversionError(f'{manifest}: {source} converts to {momentum_name(tag)}, not {name}')


def build_zoo(manifest: str, out: str, force: bool = False, push_org: str = None) -> dict:
    """Convert each manifest entry; returns {name: 'ok' or the error message}."""
    entries = (yaml.safe_load(Path(manifest).read_text()) or {}).get('models')
    if not isinstance(entries, list) or not entries:
        raise ConversionError(f'{manifest}: expected a non-empty list under models:')
    for entry in entries:
        check_entry(entry, manifest)
    status = {}
    for entry in entries:
        name = entry['name']
        try:
            convert(entry['source'], Path(out) / name, gamma=entry.get('gamma'), force=force,
                    push_to_hub=f'{push_org}/{name}' if push_org else None)
            status[name] = 'ok'
        except (ConversionError, ValueError) as e:
            status[name] = str(e)
        print(f'{name}: {status[name]}', flush=True)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--manifest', default=str(Path(__file__).with_name('zoo.yaml')))
    parser.add_argument('--out', required=True)
    parser.add_argument('--force', action='store_true')
    parser.add_argument('--push-org', default=None)
    args = parser.parse_args()
    try:
        status = build_zoo(args.manifest, args.out, args.force, args.push_org)
    except ConversionError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    failed = [name for name, result in status.items() if result != 'ok']
    print(f'{len(status) - len(failed)} converted, {len(failed)} failed')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
