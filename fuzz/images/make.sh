#!/usr/bin/env bash
# Makes the seed images of the `ops` fuzz target with QEMU's own tools, from the *.spec files
# here (which the target also reads, to know what each image holds). Run from anywhere:
#   bash fuzz/images/make.sh
# A spec's first line makes the image:
#   create <qemu-img create options and size>   a qcow2 image (qemu-img create -f qcow2 ...)
#   compressed <cluster size> <size>             written as raw, then qemu-img convert -c
# Every other line is one qemu-io run of one or more commands separated by ` ; ` (write -P,
# write -z, discard, abort), or `snapshot NAME` (qemu-img snapshot -c). Writes followed by
# `abort` in the same run leave a lazy-refcounts image dirty, as after a crash.
set -euo pipefail
cd "$(dirname "$0")"
for spec in *.spec; do
    img="${spec%.spec}.qcow2"
    rm -f "$img" "$img.raw"
    read -r kind args < "$spec"
    target="$img" fmt=qcow2
    case "$kind" in
        create)
            set -- $args
            qemu-img create -q -f qcow2 "${@:1:$#-1}" "$img" "${!#}" ;;
        compressed)
            set -- $args
            qemu-img create -q -f raw "$img.raw" "$2"
            target="$img.raw" fmt=raw ;;
        *) echo "$spec: unknown first line" >&2; exit 1 ;;
    esac
    tail -n +2 "$spec" | while read -r line; do
        case "$line" in
            ''|'#'*) ;;
            snapshot\ *) qemu-img snapshot -c "${line#snapshot }" "$target" ;;
            *)
                # One qemu-io run per line; `a ; b` runs both in it (`abort` ends it).
                cmds=()
                while IFS= read -r c; do cmds+=(-c "$c"); done < <(sed 's/ ; /\n/g' <<<"$line")
                if [[ "$line" == *abort* ]]; then
                    qemu-io -f "$fmt" "${cmds[@]}" "$target" >/dev/null 2>&1 || true
                else
                    qemu-io -f "$fmt" "${cmds[@]}" "$target" >/dev/null
                fi ;;
        esac
    done
    if [ "$kind" = compressed ]; then
        set -- $args
        qemu-img convert -q -c -f raw -O qcow2 -o "cluster_size=$1" "$img.raw" "$img"
        rm -f "$img.raw"
    fi
    qemu-img check -q "$img" >/dev/null || echo "$img: qemu-img check exit $? (a dirty lazy-refcounts image, after abort)"
done
ls -l *.qcow2
