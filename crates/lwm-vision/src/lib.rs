//! `lwm-vision`: LWM's vision side on `lwm-engine` — the VQGAN (`vqgan`), image and video
//! questions (`vision_chat`), image and video generation (`vision_generate`). The model's
//! vision embedding and head are in `lwm_core::vision_model`.

pub mod vision_chat;
pub mod vision_generate;
pub mod vqgan;
