# bids_harmony as a BIDS-App container.
#
#   docker build -t bidsharmony/bids_harmony:0.1.0 .    # CPU torch, full templates
#   docker build --build-arg TORCH_VARIANT=cu128 -t bidsharmony/bids_harmony:0.1.0-cu128 .
#   docker build --build-arg TEMPLATES=bundled ...   # no TemplateFlow server needed (CI)
#   docker run --rm -v BIDS:/data:ro -v OUT:/out bidsharmony/bids_harmony:0.1.0 /data /out participant
#
# TORCH_VARIANT picks the PyTorch wheel: cpu (default, small) or cu128 (CUDA 12.8, for
# learned harmonizers on a GPU; run with --gpus all / apptainer --nv). TORCH_INDEX_URL is the
# index it comes from; set it empty to take torch from the pip configuration instead (CI
# mounts a pip.conf and local wheel folders into the build with -v).
# TEMPLATES=full fetches MNI152NLin2009cAsym with TemplateFlow at build time; TEMPLATES=bundled
# skips that. Both pre-build the bundled MNI152NLin2009aSym (from nilearn's files), so a run
# never downloads anything.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ARG BASE
ARG VERSION=0.1.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG TEMPLATES=full

LABEL org.opencontainers.image.title="bids_harmony" \
      org.opencontainers.image.description="BIDS-App that harmonizes multi-site structural brain MRI (T1w/T2w) and proves it" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/bids-harmony/bids_harmony" \
      org.opencontainers.image.url="https://github.com/bids-harmony/bids_harmony" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}" \
      org.bids_harmony.torch-variant="${TORCH_VARIANT}" \
      org.bids_harmony.templates="${TEMPLATES}"

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}+${TORCH_VARIANT}"
COPY requirements.lock /tmp/requirements.lock
RUN pip install -r /tmp/requirements.lock && rm /tmp/requirements.lock
COPY pyproject.toml README.md /tmp/src/
COPY bids_harmony /tmp/src/bids_harmony
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src

ENV TEMPLATEFLOW_HOME=/opt/templateflow \
    NIPYPE_NO_ET=1 \
    HF_HUB_OFFLINE=1 \
    MPLBACKEND=Agg
# The TemplateFlow fetch comes first: TemplateFlow only lays out its index in an empty home.
RUN if [ "${TEMPLATES}" = full ]; then \
         python -c "from pathlib import Path; from templateflow import api; files = [Path(api.get('MNI152NLin2009cAsym', resolution=res, desc=desc, suffix=suffix, extension='.nii.gz')) for res in (1, 2) for desc, suffix in ((None, 'T1w'), ('brain', 'mask'))]; assert all(f.stat().st_size for f in files), files"; \
    elif [ "${TEMPLATES}" != bundled ]; then \
         echo "TEMPLATES must be full or bundled, not '${TEMPLATES}'" >&2; exit 1; \
    fi \
    && python -c "from pathlib import Path; from bids_harmony.data.templates import bundled_template; [bundled_template(res, Path('/opt/templateflow')) for res in (1, 2)]" \
    && chmod -R a+rX /opt/templateflow

# Any user id (docker --user, apptainer) and a read-only root work: everything the app or its
# libraries write outside OUTPUT_DIR and the work directory goes to /tmp. /opt/weights is the
# mount point for optional model weights (none are used yet).
RUN useradd --uid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin bids \
    && mkdir -p /opt/weights /data /out
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.config/matplotlib \
    TORCH_HOME=/tmp/.cache/torch \
    PYTHONDONTWRITEBYTECODE=1 \
    BIDS_HARMONY_IMAGE=bidsharmony/bids_harmony:${VERSION}
USER bids
WORKDIR /tmp
ENTRYPOINT ["bids_harmony"]
