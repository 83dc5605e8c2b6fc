"""The container formats FFmpeg may read for a stream, a job or an HLS segment.

FFmpeg picks a demuxer by probing the bytes it is given: an origin (plain HTTP media, an HLS segment, a TCP/UDP/
RTMP/SRT feed) or an uploaded file that serves `ffconcat version 1.0` / `file x.mp4` is read by the concat demuxer,
which opens that path itself, relative to the daemon's working directory: the daemon's own files decoded and
published. hls, dash, image2 (file name patterns), sdp (RTP to any address), ffmetadata, imf and the like open
other inputs too. `format_whitelist` names the demuxers that may be picked (FFmpeg refuses the input otherwise:
"Format not on whitelist"): media containers and elementary streams that open nothing else. Inputs read through a
file object (HTTP media, HLS segments) have no protocol of their own: `protocol_whitelist` lets them open none.

An operator may widen it for a stream of the config file (`ffmpeg_options.format_whitelist`); the API accepts no
such option.
"""

from __future__ import annotations

# FFmpeg demuxer names (a demuxer whose name lists several, "mov,mp4,m4a,3gp,3g2,mj2", matches any of them)
MEDIA_FORMATS = (
    "mov", "mp4", "mpegts", "matroska", "webm", "flv", "live_flv", "avi", "mpeg", "ogg", "asf",
    "h264", "hevc", "vvc", "m4v", "mpegvideo", "obu", "ivf", "yuv4mpegpipe",
    "mjpeg", "mpjpeg", "gif", "apng", "smjpeg", "mjpeg_2000",
    # broadcast, archive and other containers that open nothing but their own bytes
    "mxf", "dv", "nut", "gxf", "lxf", "mxg", "nsv", "nuv", "rm", "wtv", "r3d", "mpegtsraw",
    "dirac", "cavsvideo", "avs2", "avs3", "h261", "h263", "vc1", "evc",
    # single images (one frame); image2 (a file name pattern) and svg (external references) are left out
    "jpeg_pipe", "png_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif_pipe", "pgm_pipe", "ppm_pipe", "pbm_pipe",
    "pam_pipe", "pgmyuv_pipe", "pfm_pipe", "phm_pipe", "dpx_pipe", "exr_pipe", "j2k_pipe", "jpegls_pipe",
    "jpegxl_pipe", "jpegxs_pipe", "qoi_pipe", "sgi_pipe", "sunrast_pipe", "psd_pipe", "pcx_pipe", "pictor_pipe",
    "dds_pipe", "hdr_pipe", "gem_pipe", "xbm_pipe", "xpm_pipe", "xwd_pipe", "pgx_pipe", "photocd_pipe",
    "qdraw_pipe", "vbn_pipe", "cri_pipe",
    "rtsp",  # picked by an rtsp:// URL's name only, never by probing bytes
    "v4l2",  # a capture device (/dev/video0) of the config file
)
FORMAT_WHITELIST = ",".join(MEDIA_FORMATS)
NO_PROTOCOL = "none"  # no protocol is called that: a file-object input opens nothing by name


def open_options(file_object: bool) -> dict[str, str]:
    """The options every `av.open` of a stream's or a job's input starts from (the stream's own go on top)."""
    opts = {"format_whitelist": FORMAT_WHITELIST}
    if file_object:
        opts["protocol_whitelist"] = NO_PROTOCOL
    return opts


__all__ = ["FORMAT_WHITELIST", "MEDIA_FORMATS", "open_options"]
